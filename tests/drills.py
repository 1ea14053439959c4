"""Crash drills: start real training processes, watch the ledger and the files, SIGKILL at a chosen moment.

Processes are forked from one multiprocessing forkserver that imported torch/TRL once
(tests/crash_driver.py: PRELOAD, run_forked), so a drill process starts in milliseconds.
A moment is chosen by *observing* a state (a ledger row, a directory, a file), never by
sleeping; `settings.fault.pause_at` only makes short-lived states last long enough to be seen.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptflow.integrity import MANIFEST_NAME, checkpoint_dirs
from ckptflow.ledger import AttemptRecord, AttemptStatus, CheckpointRecord, CheckpointState, Ledger, RunRecord

from tests.helpers import ADAPTER_FILE, adapter_weights, max_abs_diff

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "crash_driver.py"

# The run every drill trains: 8 steps, chunks of 4, a save (and eval) every 2 steps, keep the
# 2 most recent (so pruning happens during training: checkpoint-2 when 6 commits).
DRILL_ENV = {
    "CKPTFLOW_TRAIN__MAX_STEPS": "8",
    "CKPTFLOW_TRAIN__CHUNK_STEPS": "4",
    "CKPTFLOW_CHECKPOINT__SAVE_STEPS": "2",
    "CKPTFLOW_CHECKPOINT__EVAL_STEPS": "2",
    "CKPTFLOW_CHECKPOINT__SAVE_TOTAL_LIMIT": "2",
    "CKPTFLOW_CHECKPOINT__RETENTION": "recent",
}
LAST_STEP = 8
# Environment of every drill subprocess: offline, no analytics, one torch thread (same numerics everywhere).
PROCESS_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
}
# How long a watched state may take to appear, and how often to look (seconds).
WATCH_TIMEOUT = 120.0
POLL = 0.005


def pause_env(point: str, step: int | None = None, seconds: float = 120) -> dict[str, str]:
    env = {"CKPTFLOW_FAULT__PAUSE_AT": point, "CKPTFLOW_FAULT__PAUSE_SECONDS": str(seconds)}
    if step is not None:
        env["CKPTFLOW_FAULT__PAUSE_STEP"] = str(step)
    return env


# -- processes --------------------------------------------------------------------------------
@functools.cache
def _forkserver() -> Any:
    from tests.crash_driver import PRELOAD

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


class Driver:
    """One forked `crash_driver` process training run `run_name` in `home`."""

    def __init__(self, home: Path, run_name: str, env: dict[str, str] | None = None, command: str = "run") -> None:
        from tests.crash_driver import run_forked

        self.home, self.run_name = Path(home), run_name
        self.log = self.home.parent / f"{run_name}-{time.monotonic_ns()}.log"
        self.home.mkdir(parents=True, exist_ok=True)
        full_env = {"CKPTFLOW_HOME": str(self.home), **DRILL_ENV, **(env or {})}
        args = (run_name, full_env, str(self.home.parent), str(self.log), command)
        self.proc = _forkserver().Process(target=run_forked, args=args)
        self.proc.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(30)
        assert self.proc.exitcode == -signal.SIGKILL, self.output()

    def wait(self, timeout: float = 300) -> int:
        self.proc.join(timeout)
        assert self.proc.exitcode is not None, f"{self.run_name} still running after {timeout}s"
        return self.proc.exitcode

    def alive(self) -> bool:
        return self.proc.is_alive()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def run_driver(home: Path, run_name: str, env: dict[str, str] | None = None, command: str = "run") -> tuple[int, str]:
    d = Driver(home, run_name, env, command)
    code = d.wait()
    return code, d.output()


def cli(*args: str, home: Path, env: dict[str, str] | None = None, timeout: float = 300, **popen: Any):
    """`python -m ckptflow.cli ARGS` as a real process in home's parent directory, with the drill settings."""
    full_env = {**os.environ, **PROCESS_ENV, "CKPTFLOW_HOME": str(home), **DRILL_ENV, **(env or {})}
    command = [sys.executable, "-m", "ckptflow.cli", *args]
    if popen:
        return subprocess.Popen(command, cwd=home.parent, env=full_env, text=True, **popen)
    return subprocess.run(command, cwd=home.parent, env=full_env, capture_output=True, text=True, timeout=timeout)


# -- observing ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class State:
    """What a drill sees of one run at one instant."""

    run: RunRecord | None
    rows: dict[int, CheckpointRecord]
    attempts: list[AttemptRecord]
    lease: str | None
    exports: int
    checkpoints_dir: Path
    export_dir: Path

    def state(self, step: int) -> CheckpointState | None:
        row = self.rows.get(step)
        return row.state if row else None

    def committed(self) -> list[int]:
        return [s for s, r in sorted(self.rows.items()) if r.state == CheckpointState.COMMITTED]

    def ckpt(self, step: int) -> Path:
        return self.checkpoints_dir / f"checkpoint-{step}"

    def has_file(self, step: int, name: str) -> bool:
        return (self.ckpt(step) / name).is_file()

    def has_manifest(self, step: int) -> bool:
        return self.has_file(step, MANIFEST_NAME)

    def running(self, chunk: int) -> AttemptRecord | None:
        return next((a for a in self.attempts if a.chunk == chunk and a.status == AttemptStatus.RUNNING), None)

    def export_leftovers(self) -> list[str]:
        parent = self.export_dir.parent
        return sorted(p.name for p in parent.glob(f".{self.export_dir.name}.*")) if parent.is_dir() else []


class Watcher:
    """Reads a run's ledger rows and directories (readers never block the writer: SQLite WAL)."""

    def __init__(self, home: Path, run_name: str) -> None:
        self.home, self.run_name = Path(home), run_name
        self._ledger: Ledger | None = None

    def _open(self) -> Ledger | None:
        if self._ledger is None and (self.home / "ledger.db").exists():
            self._ledger = Ledger(f"sqlite:///{(self.home / 'ledger.db').resolve()}")
        return self._ledger

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()

    def state(self) -> State:
        ledger = self._open()
        run = ledger.get_run(self.run_name) if ledger else None
        rows = {c.step: c for c in ledger.checkpoints(run.id)} if run else {}
        attempts = ledger.attempts(run.id) if run else []
        lease = ledger.lease_holder(run.id) if run else None
        exports = len(ledger.exports(run.id)) if run else 0
        return State(
            run,
            rows,
            attempts,
            lease,
            exports,
            self.home / "runs" / self.run_name / "checkpoints",
            self.home / "exports" / self.run_name,
        )

    def wait_for(self, predicate: Callable[[State], bool], proc: Driver | subprocess.Popen, what: str) -> State:
        """Poll until `predicate(state)`; fails if the process exits first or it takes too long."""
        deadline = time.monotonic() + WATCH_TIMEOUT
        while time.monotonic() < deadline:
            try:
                st = self.state()
                if st.run is not None and predicate(st):
                    return st
            except Exception:  # the ledger is being created by the process: look again
                pass
            exited = (not proc.alive()) if isinstance(proc, Driver) else proc.poll() is not None
            if exited:
                out = proc.output() if isinstance(proc, Driver) else ""
                raise AssertionError(f"process exited before {what}:\n{out[-3000:]}")
            time.sleep(POLL)
        raise AssertionError(f"timed out waiting for {what}")


# -- checking ---------------------------------------------------------------------------------
def committed_checkpoints_verify(home: Path, run_name: str) -> dict[int, list[str]]:
    """verify_run over the committed rows (what may be resumed from or exported)."""
    from ckptflow.recovery import verify_run

    with Ledger(f"sqlite:///{(home / 'ledger.db').resolve()}") as ledger:
        run = ledger.get_run(run_name)
        return verify_run(ledger, run.id) if run else {}


def full_verify(home: Path, run_name: str) -> dict[int, list[str]]:
    """verify_run over committed rows and every checkpoint directory (partial ones count)."""
    from ckptflow.recovery import verify_run

    with Ledger(f"sqlite:///{(home / 'ledger.db').resolve()}") as ledger:
        run = ledger.get_run(run_name)
        return verify_run(ledger, run.id, home / "runs" / run_name / "checkpoints")


@functools.cache
def reference_adapter(extra_env: tuple[tuple[str, str], ...] = ()) -> Path:
    """Final adapter of an uninterrupted drill run (trained once per session and settings)."""
    root = Path(tempfile.mkdtemp(prefix="ckptflow-reference-"))
    code, out = run_driver(root / "home", "reference", dict(extra_env))
    assert code == 0, out
    path = root / "home" / "runs" / "reference" / "checkpoints" / f"checkpoint-{LAST_STEP}" / ADAPTER_FILE
    keep = root / "reference-adapter.safetensors"
    shutil.copyfile(path, keep)
    export = root / "home" / "exports" / "reference" / "model.safetensors"
    shutil.copyfile(export, root / "reference-export.safetensors")
    return keep


def reference_export(extra_env: tuple[tuple[str, str], ...] = ()) -> Path:
    return reference_adapter(extra_env).with_name("reference-export.safetensors")


def final_diff(home: Path, run_name: str, extra_env: tuple[tuple[str, str], ...] = ()) -> float:
    """max |Δ| between this run's final adapter and the uninterrupted reference's."""
    final = home / "runs" / run_name / "checkpoints" / f"checkpoint-{LAST_STEP}"
    return max_abs_diff(adapter_weights(final), _load(reference_adapter(extra_env)))


def export_diff(home: Path, run_name: str, extra_env: tuple[tuple[str, str], ...] = ()) -> float:
    return max_abs_diff(_load(home / "exports" / run_name / "model.safetensors"), _load(reference_export(extra_env)))


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def checkpoint_dir_names(home: Path, run_name: str) -> list[str]:
    return [p.name for p in checkpoint_dirs(home / "runs" / run_name / "checkpoints")]
