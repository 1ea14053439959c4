"""Crash drills: start real `ckptflow` processes, watch the ledger and the files, SIGKILL at a chosen moment.

Every drill process is the real CLI (`ckptflow run` = the `finetune` flow of flows/finetune.py,
`ckptflow export`), reporting to one real `prefect server start` per test session
(`session_server`: ~10 s once, instead of a temporary server per process). The processes are
forked from a multiprocessing forkserver that imported torch/TRL/Prefect/the flow once
(`PRELOAD`, `run_forked`): each is still a real process that is SIGKILLed for real, but starts
in milliseconds instead of ~10 s of imports. The forkserver only imports modules — it starts no
Prefect client, event loop or thread that a forked child could inherit half-used.

A moment is chosen by *observing* a state (a ledger row, a directory, a file), never by
sleeping; `settings.fault.pause_at` only makes short-lived states last long enough to be seen.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptflow.integrity import MANIFEST_NAME, checkpoint_dirs
from ckptflow.ledger import AttemptRecord, AttemptStatus, CheckpointRecord, CheckpointState, Ledger, RunRecord

from tests.helpers import ADAPTER_FILE, adapter_weights, max_abs_diff
from tests.prefect_db import seed_prefect_home

REPO = Path(__file__).resolve().parents[1]

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
# Forked drill processes run without Prefect retries: an injected fault or a full disk ends the
# process with exit 1 (what a drill then reruns), instead of being retried away.
DRIVER_ENV = {"CKPTFLOW_TRAIN__RETRIES": "0"}
# Environment of every drill process: offline, no analytics, one torch thread (same numerics everywhere).
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
SERVER_START_TIMEOUT = 120.0
# Modules the forkserver imports once for all drill processes: what every `ckptflow run` imports anyway.
PRELOAD = [
    "torch",
    "transformers.trainer",
    "trl.trainer.sft_trainer",
    "peft",
    "datasets",
    "ckptflow.cli",
    "ckptflow.chunks",
    "ckptflow.data",
    "ckptflow.evaluation",
    "ckptflow.export",
    "ckptflow.modeling",
    "ckptflow.pipeline",
    "ckptflow.planner",
    "flows.finetune",
    "tasks.pipeline",
    "tasks.reporting",
    "tests.drills",
]


def pause_env(point: str, step: int | None = None, seconds: float = 120) -> dict[str, str]:
    env = {"CKPTFLOW_FAULT__PAUSE_AT": point, "CKPTFLOW_FAULT__PAUSE_SECONDS": str(seconds)}
    if step is not None:
        env["CKPTFLOW_FAULT__PAUSE_STEP"] = str(step)
    return env


# -- the Prefect server ------------------------------------------------------------------------
@dataclass(frozen=True)
class PrefectServer:
    """A running `prefect server start`; `env` points a process at it (and at its own PREFECT_HOME)."""

    api_url: str
    prefect_home: Path

    @property
    def env(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.api_url, "PREFECT_HOME": str(self.prefect_home)}


@contextlib.contextmanager
def running_prefect_server(root: Path) -> Iterator[PrefectServer]:
    """`prefect server start` on a free local port in its own process group; killed (group) at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = PrefectServer(f"http://127.0.0.1:{port}/api", root / "prefect-home")
    log = root / "prefect-server.log"
    command = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with log.open("w") as out:
        env = {**os.environ, **PROCESS_ENV, **server.env}
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(server.api_url, proc, log)
        yield server
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
                break


@functools.cache
def session_server() -> PrefectServer:
    """The one Prefect server of this test process, started on first use; stopped and its files removed at exit."""
    root = _temporary_root("ckptflow-prefect-")
    seed_prefect_home(root / "prefect-home")  # a migrated database: the server starts without migrating
    server = running_prefect_server(root)
    started = server.__enter__()
    atexit.register(server.__exit__, None, None, None)  # atexit runs last-in first-out: stopped, then removed
    return started


def _temporary_root(prefix: str) -> Path:
    """A new directory under the system's temp dir, removed at exit (session-wide caches outlive any fixture)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, root, True)
    return root


def _wait_healthy(api_url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.2)
    raise RuntimeError(f"prefect server not healthy after {SERVER_START_TIMEOUT:.0f}s:\n{log.read_text()[-3000:]}")


# -- processes --------------------------------------------------------------------------------
@functools.cache
def _forkserver(server: PrefectServer) -> Any:
    """The forkserver, started with `server`'s environment: Prefect reads its settings once, at import."""
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    with _environ({**PROCESS_ENV, **server.env}):  # the forkserver inherits this process's environment
        forkserver.ensure_running()
    return ctx


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_forked(argv: list[str], env: dict[str, str], cwd: str, log_path: str, api_url: str) -> None:
    """multiprocessing target: become `ckptflow ARGV` (the real CLI) with exactly `env`'s CKPTFLOW_* settings."""
    for key in [k for k in os.environ if k.startswith("CKPTFLOW_")]:
        del os.environ[key]
    os.environ.update(env)
    os.chdir(cwd)
    import torch
    from prefect.settings import PREFECT_API_URL

    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in every other drill process: the same numerics
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    print(f"{time.strftime('%H:%M:%S')} forked: ckptflow {' '.join(argv)}", file=sys.stderr, flush=True)
    code = 1
    try:
        assert PREFECT_API_URL.value() == api_url, f"forkserver reports to {PREFECT_API_URL.value()}, not {api_url}"
        from ckptflow.cli import app

        app(argv, prog_name="ckptflow")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Driver:
    """One forked `ckptflow run --run-name RUN` (or `ckptflow export RUN`) process on `home`."""

    def __init__(self, home: Path, run_name: str, env: dict[str, str] | None = None, command: str = "run") -> None:
        self.home, self.run_name = Path(home), run_name
        self.log = self.home.parent / f"{run_name}-{time.monotonic_ns()}.log"
        self.home.mkdir(parents=True, exist_ok=True)
        full_env = {"CKPTFLOW_HOME": str(self.home), **DRILL_ENV, **DRIVER_ENV, **(env or {})}
        argv = ["run", "--run-name", run_name] if command == "run" else [command, run_name]
        server = session_server()
        args = (argv, full_env, str(self.home.parent), str(self.log), server.api_url)
        self.proc = _forkserver(server).Process(target=run_forked, args=args)
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
    root = _temporary_root("ckptflow-reference-")
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
