"""launcher=subprocess: one child process per run trains the run's chunks, one after another.

A fresh interpreter per chunk spent ~3.7 s re-importing torch, transformers and TRL. The run's
child stays up between chunks instead (`python -m ckptflow.worker --serve`), with its imports,
tokenizer and data warm (warm.py); every chunk still gets a fresh model and trainer.

Crash semantics are those of a fresh child per chunk: a child that dies or fails exits (worker.py
ends on the first failure), the parent raises as before (ChunkProcessError: retried; disk full,
bad input: not), and the retry starts a new child. The child dies with its parent (PDEATHSIG):
Linux sends that signal when the *thread* that started the child ends, so each child is started
by a thread of its own that lives exactly as long as the child.

The child is closed after the run's last chunk, when another run's chunk needs a child, and at
exit; a run stopped between chunks (cancelled) leaves it idle until one of those.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import logging
import os
import subprocess
import sys
import threading

from ckptflow.chunks import AttemptPlan, ChunkJob
from ckptflow.launchers import _failure, _kill, _stream, child_env
from ckptflow.worker import CHUNK_DONE_PREFIX, SERVE_ARG

log = logging.getLogger(__name__)

__all__ = ["RunChild", "close_all", "train_in_run_child"]

# Seconds a closed child may take to exit by itself before it is killed.
_EXIT_GRACE_SECONDS = 30


class RunChild:
    """A serving worker process (`python -m ckptflow.worker --serve`) that trains the attempts it is sent."""

    def __init__(self, key: str, env: dict[str, str]) -> None:
        self.key = key
        self.chunks = 0  # attempts trained successfully
        self._seq = itertools.count(1)
        self._started = threading.Event()
        self._exited = threading.Event()
        self._proc: subprocess.Popen | None = None
        self._error: BaseException | None = None
        self._owner = threading.Thread(target=self._own, args=(env,), name="ckptflow-run-child", daemon=True)
        self._owner.start()
        self._started.wait()
        if self._error is not None:
            raise self._error

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def train(self, job: ChunkJob, plan: AttemptPlan) -> None:
        """Train one attempt in the child; raise like launchers._run_child when it fails (the child is then gone)."""
        proc = self._proc
        assert proc is not None and proc.stdin is not None
        seq = next(self._seq)
        request = json.dumps({"job": job.to_json(), "plan": plan.to_json(), "seq": seq})  # no ledger URL: env
        try:
            try:
                proc.stdin.write(request + "\n")
                proc.stdin.flush()
            except OSError:  # it died meanwhile: its exit code tells how
                pass
            tail, timed_out, done = _stream(proc, job.chunk, until=f"{CHUNK_DONE_PREFIX}{seq}")
        except BaseException:
            self.close(kill=True)  # we raise (Ctrl-C, a Prefect cancel): the child must not train on unobserved
            raise
        if done:
            self.chunks += 1
            return
        code = proc.wait()  # its output ended: it exited without finishing the attempt
        self.close()
        raise _failure(job, proc.pid, code, tail, timed_out)

    def close(self, *, kill: bool = False) -> None:
        """End the child (closing its stdin ends it after the current attempt), reap it, end its owner thread."""
        proc = self._proc
        if proc is not None:
            if kill:
                _kill(proc)
            if proc.stdin is not None and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            try:
                proc.wait(_EXIT_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                _kill(proc)
            if proc.stdout is not None:
                proc.stdout.close()
        self._exited.set()
        if threading.current_thread() is not self._owner:
            self._owner.join()

    def _own(self, env: dict[str, str]) -> None:
        """Start the child and stay alive until it has exited (its PDEATHSIG is tied to this thread)."""
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "ckptflow.worker", SERVE_ARG],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env,
            )  # fmt: skip
        except BaseException as exc:  # noqa: BLE001 - handed to the constructor's caller
            self._error = exc
            self._exited.set()
        finally:
            self._started.set()
        self._exited.wait()


_lock = threading.Lock()
_idle: dict[str, RunChild] = {}  # children between two chunks of their run, by run key


def run_key(job: ChunkJob, env: dict[str, str]) -> str:
    """Which child may train `job`: one of the same run, started with the same environment in the same directory."""
    document = json.dumps([job.ledger_url, job.run_name, sorted(env.items()), os.getcwd()])
    return hashlib.sha256(document.encode()).hexdigest()


def train_in_run_child(job: ChunkJob, plan: AttemptPlan) -> None:
    """Train the attempt in its run's child (started now if there is none alive); keep the child for the next chunk."""
    env = child_env(job)
    key = run_key(job, env)
    with _lock:
        child = _idle.pop(key, None)
        others = list(_idle.values())  # one run at a time: a new run's chunk ends the idle children of others
        _idle.clear()
    for other in others:
        other.close()
    if child is not None and not child.alive():
        child.close()
        child = None
    if child is None:
        child = RunChild(key, env)
        log.info("chunk %d: started training process %d for run %s", job.chunk, child.pid, job.run_name)
    child.train(job, plan)  # raises when the child failed; it is gone then
    last = plan.total_steps is not None and job.end_step >= plan.total_steps
    if last:
        child.close()
        return
    with _lock:
        _idle[key] = child


def close_all() -> None:
    """Close every idle child (at exit; tests)."""
    with _lock:
        children = list(_idle.values())
        _idle.clear()
    for child in children:
        child.close()


atexit.register(close_all)
