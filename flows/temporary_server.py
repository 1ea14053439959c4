"""Prefect's temporary API server, booting in its own process while `ckptflow run` checks the model and imports.

Without an API URL, Prefect's engine starts a temporary server (`SubprocessASGIServer`) at the
flow's first API call: it imports the whole server application into this process (~2.6 s of
CPU, only to spawn a child that imports it again) and then waits 3-5 s for the child to answer.
Here the child is the same (Prefect's uvicorn app factory, environment and settings), in two
steps, so that it boots on another core while this process works:

1. `prewarm()` — as soon as no answer can refuse the run before its model check — spawns a
   child that only imports the server application and waits on its stdin. It binds no port,
   starts no server and touches no database: if the model check refuses the run,
   `cancel_prewarm` (also at exit) ends it and Prefect never ran (importing Prefect does make
   an empty PREFECT_HOME directory, as any Prefect import does).
2. `start()` — once the run will train — reads Prefect's settings: with an API URL configured
   anywhere (env, profile, .env, toml) the child is ended and the flow uses that server;
   otherwise the child is told its port and serves. `TemporaryServer.wait()` returns once it
   answers, before the flow's first call.

The server is stopped at exit like Prefect's own (SIGTERM, then SIGKILL after 5 s), after
Prefect's log and event workers have flushed (they drain before any atexit handler runs).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ckptflow.errors import CkptflowError

__all__ = ["TemporaryServer", "cancel_prewarm", "prewarm", "start"]

# Environment Prefect gives its temporary server (prefect.server.api.server.SubprocessASGIServer).
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
# uvicorn's exit status when it cannot bind the port (another process took it meanwhile): try another.
_PORT_TAKEN = 3
_POLL_SECONDS = 0.1
# The prewarmed child: imports the server app (the slow part), then serves on the port its stdin names;
# an empty stdin (the parent refused the run, or died) ends it. uvicorn.run == `python -m uvicorn` + flags.
_PREWARMED_SERVER = """
import sys
import uvicorn
import prefect.server.api.server
port = sys.stdin.readline().strip()
if not port:
    raise SystemExit(0)
uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=int(port),
            log_level="error", lifespan="on")
"""
_prewarmed: subprocess.Popen | None = None


@dataclass
class TemporaryServer:
    """A temporary server this process started; `api_url` is what PREFECT_API_URL now says."""

    port: int
    process: subprocess.Popen
    timeout: float
    env: dict[str, str] = field(repr=False)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self) -> None:
        """Return once the server answers /health; CkptflowError if it exits or stays silent.

        The timeout counts polls as Prefect's own start does (`timeout` / 0.1 s of them, each one
        a refused connection plus a 0.1 s sleep), so a busy machine gets the same grace as before.
        """
        polls = 0
        while polls * _POLL_SECONDS < self.timeout:
            status = self.process.poll()
            if status == _PORT_TAKEN:
                self._respawn()
            elif status is not None:
                raise CkptflowError(f"Prefect's temporary server exited with status {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=10) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(_POLL_SECONDS)
            polls += 1
        raise CkptflowError(
            f"Prefect's temporary server did not answer within {self.timeout:.0f} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or set PREFECT_API_URL to a running server)"
        )

    def stop(self) -> None:
        from prefect.logging import get_logger

        get_logger().info(f"Stopping temporary server on http://127.0.0.1:{self.port}")
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _respawn(self) -> None:
        self.port = _free_port()
        self.process = _spawn(self.port, self.env)
        _point_prefect_at(self.api_url)


def prewarm() -> None:
    """Spawn a child that imports Prefect's server app and waits to be told a port (see the module docstring).

    Not when PREFECT_API_URL is in the environment (the flow will use that server); an API URL set
    in a Prefect profile is only known once Prefect is imported: `start()` then ends the child.
    """
    global _prewarmed
    if _prewarmed is not None or os.environ.get("PREFECT_API_URL"):
        return
    _prewarmed = subprocess.Popen(
        [sys.executable, "-c", _PREWARMED_SERVER], stdin=subprocess.PIPE, env={**os.environ, **_SERVER_ENV}
    )
    atexit.register(cancel_prewarm)


def cancel_prewarm() -> None:
    """End the prewarmed child unless `start()` made it the server (a refused run, or a server configured)."""
    global _prewarmed
    child, _prewarmed = _prewarmed, None
    if child is not None and child.poll() is None:
        child.terminate()
        child.wait()


def start() -> TemporaryServer | None:
    """The temporary server, serving (the prewarmed child if any); None when an API URL is configured."""
    global _prewarmed
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        cancel_prewarm()
        return None
    env = {**os.environ, **_SERVER_ENV, **settings.to_environment_variables(exclude_unset=True)}
    port = _free_port()
    child, _prewarmed = _prewarmed, None
    if not _serve_on(child, port):
        child = _spawn(port, env)
    server = TemporaryServer(port, child, float(settings.server.ephemeral.startup_timeout_seconds), env)
    atexit.register(server.stop)
    _point_prefect_at(server.api_url)
    import prefect.main  # noqa: F401 — configures Prefect's logging (the flow imports it anyway)
    from prefect.logging import get_logger

    get_logger().info(
        f"Starting temporary server on http://127.0.0.1:{port}\nSee "
        "https://www.prefect.io/docs/v3/concepts/server#how-to-guides "
        "for more information on running a dedicated Prefect server."
    )
    return server


def _serve_on(child: subprocess.Popen | None, port: int) -> bool:
    """Tell the prewarmed child its port; False if there is none (or it died: then a fresh server is spawned)."""
    if child is None or child.poll() is not None or child.stdin is None:
        return False
    try:
        child.stdin.write(f"{port}\n".encode())
        child.stdin.close()
    except OSError:  # it died meanwhile
        return False
    return True


def _spawn(port: int, env: dict[str, str]) -> subprocess.Popen:
    import prefect

    command = [
        sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__module_path__).parent),
        "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "error", "--lifespan", "on",
    ]  # fmt: skip
    return subprocess.Popen(command, env=env)


def _point_prefect_at(api_url: str) -> None:
    """Every Prefect client of this process — the engine's and its worker threads' — uses `api_url`.

    The process-wide settings (not a context manager): Prefect's log and event workers run in
    threads that do not see the caller's context. The UI URL stays unset: the temporary server
    serves no UI, so Prefect prints no "View at" link to it, as with its own temporary server.
    """
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = api_url
    os.environ.setdefault("PREFECT_UI_URL", "")
    refresh_global_settings_context()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
