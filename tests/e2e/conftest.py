"""A real Prefect stack for e2e tests: `prefect server start`, the process work pool and deployments
from deployments/prefect.yaml (via deploy.sh), and a worker — each a subprocess in its own
process group, all killed (with every descendant) when the module's tests finish.

Each server gets its own PREFECT_HOME, seeded with a copy of one database that `prefect server
database upgrade` made once per session (`seed_prefect_home`): a server on a fresh database runs
every migration first, which on 2 busy cores takes longer than the rest of its start (tests/prefect_db.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.prefect_db import seed_prefect_home

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
POOL = "ckptflow-process"
SERVER_START_TIMEOUT_S = 120
# How often to ask a starting server for /health (seconds): each wasted poll delays every stack.
HEALTH_POLL_S = 0.1
# How long a stopping test waits for flow-run processes whose runs are final to exit on their own (seconds).
FLOW_RUN_EXIT_TIMEOUT_S = 30
# A teardown step slower than this is reported as a pytest warning (CI time: where the seconds go).
SLOW_STOP_S = 5


@dataclass
class Stack:
    api_url: str
    env: dict[str, str]  # for CLI calls against this server
    ckptflow_home: Path  # the worker's CKPTFLOW_HOME
    logs: Path
    deploy_output: str = ""
    auth_string: str | None = None  # what clients send (PREFECT_API_AUTH_STRING), None = server without auth

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the prefect CLI against this server; output captured as text."""
        return subprocess.run(
            [str(BIN / "prefect"), *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(prefect_home: Path, api_url: str) -> dict[str, str]:
    """This process's environment without Prefect/ckptflow settings, pointed at the test server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CKPTFLOW_"))}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_API_URL=api_url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        PREFECT_LOGGING_LEVEL="INFO",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def start_process(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _finishing_flow_runs(descendants: list) -> list:
    """The flow-run processes (`python -m prefect.engine`) among `descendants` that are still alive."""
    import psutil

    alive = []
    for child in descendants:
        try:
            if "prefect.engine" in child.cmdline():
                alive.append(child)
        except psutil.Error:
            pass
    return alive


def wait_flow_runs_exited(proc: subprocess.Popen) -> None:
    """Wait (at most FLOW_RUN_EXIT_TIMEOUT_S) until the flow-run processes under `proc` have exited."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    psutil.wait_procs(_finishing_flow_runs(descendants), timeout=FLOW_RUN_EXIT_TIMEOUT_S)


def _warn_slow(proc: subprocess.Popen, what: str, descendants: list) -> None:
    """A pytest warning (listed at the end of the run, CI included) naming the slow process and its children."""
    import psutil

    def describe(p) -> str:
        try:
            return f"{p.pid} {' '.join(p.cmdline())[:120]} ({p.status()})"
        except psutil.Error:
            return f"{p.pid} (gone)"

    alive = "; ".join(describe(c) for c in descendants if c.is_running()) or "none"
    warnings.warn(f"slow e2e teardown: {' '.join(map(str, proc.args))[:120]} {what}; descendants: {alive}", stacklevel=3)


def stop_process(proc: subprocess.Popen) -> None:
    """Let flow-run processes finish exiting, SIGTERM the process group, then SIGKILL it and every
    descendant that escaped it.

    A flow run's state is final (what the tests wait for) before its process has exited. A SIGTERM to the
    group then hits that process mid-exit, and its worker or `ckptflow serve` cancels it and checks every
    3 s, for up to 30 s, whether it died: teardowns took 15-30 s under load. Left alone, it exits in seconds."""
    import psutil

    started = time.monotonic()
    wait_flow_runs_exited(proc)
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    if time.monotonic() - started > SLOW_STOP_S:
        _warn_slow(proc, f"flow-run processes took {time.monotonic() - started:.1f}s to exit", descendants)
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            _warn_slow(proc, f"did not exit within {wait}s of {sig.name}", descendants)
            continue
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants, timeout=5)


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(HEALTH_POLL_S)
    raise RuntimeError(f"prefect server not healthy after {SERVER_START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


@contextlib.contextmanager
def start_stack(root: Path, *, auth_string: str | None = None, worker_args: tuple[str, ...] = ()) -> Iterator[Stack]:
    """Server (bound to 127.0.0.1 on a free port), pool and deployments (deploy.sh), and a worker under `root`.

    With `auth_string` ("user:password") the server requires it (PREFECT_SERVER_API_AUTH_STRING) and
    every client here — deploy.sh, the worker, `stack.env` — sends it (PREFECT_API_AUTH_STRING).
    `worker_args` are added to `prefect worker start` (e.g. `--limit 2`)."""
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = _clean_env(root / "prefect-home", api_url)
    # As in the README: the server's shell has no client settings; PREFECT_UI_API_URL is what browsers call
    # (without it the UI would call port 4200).
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"} | {"PREFECT_UI_API_URL": api_url}
    if auth_string is not None:
        env["PREFECT_API_AUTH_STRING"] = auth_string
        server_env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    home = root / "ckptflow-home"
    stack = Stack(api_url, env, home, root, auth_string=auth_string)
    procs: list[subprocess.Popen] = []
    try:
        seed_prefect_home(root / "prefect-home")
        server_log = root / "server.log"
        server = start_process(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_env, server_log
        )
        procs.append(server)
        _wait_healthy(api_url, server, server_log)
        deployed = subprocess.run(
            ["bash", str(REPO / "deployments" / "deploy.sh")], env=env, capture_output=True, text=True, timeout=300
        )
        assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
        stack.deploy_output = deployed.stdout + deployed.stderr
        worker_env = {**env, "CKPTFLOW_HOME": str(home)}
        worker = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, *worker_args]
        procs.append(start_process(worker, worker_env, root / "worker.log"))
        yield stack
    finally:
        for proc in reversed(procs):
            stop_process(proc)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    with start_stack(tmp_path_factory.mktemp("prefect-stack")) as started:
        yield started


# How long an e2e test waits for a flow run to reach a final state (seconds).
FLOW_RUN_TIMEOUT_S = 300
# How often to read the flow run's state (seconds): a final state is seen at most this late.
FLOW_RUN_POLL_S = 0.25


def wait_final(client, flow_run_id, stack: Stack):
    """The flow run once its state is final; AssertionError with the worker's log tail after FLOW_RUN_TIMEOUT_S."""
    deadline = time.monotonic() + FLOW_RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        run = client.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        time.sleep(FLOW_RUN_POLL_S)
    worker_log = (stack.logs / "worker.log").read_text()[-5000:]
    raise AssertionError(f"flow run {flow_run_id} not finished after {FLOW_RUN_TIMEOUT_S}s; worker log:\n{worker_log}")
