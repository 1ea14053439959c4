"""flows/temporary_server.py starts Prefect's temporary server itself (to boot it while the model is checked):
its command and environment must stay Prefect's own. This fails when a Prefect upgrade changes them."""

import pytest

from flows import temporary_server

PORT = "4711"  # recorded, never bound


@pytest.fixture
def prefect_command(monkeypatch):
    """The command and environment Prefect's own SubprocessASGIServer would spawn (recorded, not run)."""
    from prefect.server.api import server

    seen = {}

    def record(args, env, **_):
        # Popen is patched process-wide: a Prefect log worker left by an earlier test may start a real
        # temporary server meanwhile (another port). Only the call made here is recorded.
        if PORT in args:
            seen.update(args=list(args), env=env)

    monkeypatch.setattr(server.subprocess, "Popen", record)
    asgi = server.SubprocessASGIServer.__new__(server.SubprocessASGIServer)
    asgi.port = int(PORT)
    asgi._run_uvicorn_command()
    return seen


def test_spawn_uses_prefects_command_and_server_environment(prefect_command, monkeypatch):
    ours = {}
    monkeypatch.setattr(
        temporary_server.subprocess, "Popen", lambda command, env: ours.update(args=command, env=env) if PORT in command else None
    )
    temporary_server._spawn(int(PORT), {**prefect_command["env"], **temporary_server._SERVER_ENV})
    assert ours["args"] == prefect_command["args"]
    for key, value in temporary_server._SERVER_ENV.items():
        assert prefect_command["env"][key] == value
    assert {k for k in prefect_command["env"] if k.startswith("PREFECT__")} <= set(temporary_server._SERVER_ENV)

