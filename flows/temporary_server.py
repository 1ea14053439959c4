"""Prefect's temporary API server, started ahead of the flow so that it boots while `ckptflow run` imports the rest.

Without an API URL, Prefect's engine starts a temporary server (`SubprocessASGIServer`) at the
flow's first API call: it imports the whole server application into this process (~2.6 s of
CPU, only to spawn a child that imports it again) and then waits 3-4 s for the child to answer.
`start()` spawns the same child — Prefect's command, environment and settings — without that
import, before the rest of the flow's imports, so the child boots on another core meanwhile;
`TemporaryServer.wait()` makes sure it answers before the flow's first call. The server is
stopped at exit like Prefect's own (SIGTERM, then SIGKILL after 5 s), after Prefect's log and
event workers have flushed (they drain before any atexit handler runs).
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

__all__ = ["TemporaryServer", "start"]

# Environment Prefect gives its temporary server (prefect.server.api.server.SubprocessASGIServer).
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
# uvicorn's exit status when it cannot bind the port (another process took it meanwhile): try another.
_PORT_TAKEN = 3
_POLL_SECONDS = 0.1


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
        """Return once the server answers /health; CkptflowError if it exits or stays silent for `timeout` s."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.process.poll() == _PORT_TAKEN:
                self._respawn()
            elif self.process.poll() is not None:
                raise CkptflowError(f"Prefect's temporary server exited with status {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(_POLL_SECONDS)
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


def start() -> TemporaryServer | None:
    """Spawn Prefect's temporary server unless an API URL is configured (env, profile, .env, toml); None then."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url:
        return None
    env = {**os.environ, **_SERVER_ENV, **settings.to_environment_variables(exclude_unset=True)}
    port = _free_port()
    server = TemporaryServer(port, _spawn(port, env), float(settings.server.ephemeral.startup_timeout_seconds), env)
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
