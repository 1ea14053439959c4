"""flows/temporary_server.py starts Prefect's temporary server itself (to boot it while the model is checked):
its command and environment must stay Prefect's own. This fails when a Prefect upgrade changes them."""

import pytest

from flows import temporary_server


@pytest.fixture
def prefect_command(monkeypatch):
    """The command and environment Prefect's own SubprocessASGIServer would spawn (recorded, not run)."""
    from prefect.server.api import server

    seen = {}

    def record(args, env, **_):
        seen.update(args=list(args), env=env)
        return None

    monkeypatch.setattr(server.subprocess, "Popen", record)
    asgi = server.SubprocessASGIServer.__new__(server.SubprocessASGIServer)
    asgi.port = 4711
    asgi._run_uvicorn_command()
    return seen


def test_spawn_uses_prefects_command_and_server_environment(prefect_command, monkeypatch):
    ours = {}
    monkeypatch.setattr(temporary_server.subprocess, "Popen", lambda command, env: ours.update(args=command, env=env))
    temporary_server._spawn(4711, {**prefect_command["env"], **temporary_server._SERVER_ENV})
    assert ours["args"] == prefect_command["args"]
    for key, value in temporary_server._SERVER_ENV.items():
        assert prefect_command["env"][key] == value
    assert {k for k in prefect_command["env"] if k.startswith("PREFECT__")} <= set(temporary_server._SERVER_ENV)

