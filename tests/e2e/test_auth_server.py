"""The team's Prefect server with authentication (README: Team setup; issue 15.4).

The server runs with PREFECT_SERVER_API_AUTH_STRING, bound to 127.0.0.1 on a non-default port with
PREFECT_UI_API_URL; deploy.sh, the worker and the clients here send PREFECT_API_AUTH_STRING.
Without it (or with a wrong one) the API answers 401 and our tools exit 2 naming the variable;
with it, the worker runs the `finetune` deployment to Completed and `ckptflow serve` registers both.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prefect.client.orchestration import SyncPrefectClient

from tests.e2e.conftest import BIN, POOL, REPO, Stack, start_process, start_stack, stop_process, wait_final

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUN = "auth"
# Chunks of 2 of the demo's 4 steps: two task runs, no fault.
FINETUNE_PARAMETERS = {"run_name": RUN, "overrides": {"train": {"chunk_steps": 2}}}
# The message deploy.sh and `ckptflow serve` print on a 401.
NAMES_THE_VARIABLE = "set PREFECT_API_AUTH_STRING"


@pytest.fixture(scope="module")
def auth_stack(tmp_path_factory) -> Iterator[Stack]:
    """Server with a unique auth string; pool and deployments made by deploy.sh, and a worker, both authenticated."""
    auth_string = f"ckptflow:{secrets.token_urlsafe(18)}"
    with start_stack(tmp_path_factory.mktemp("auth-stack"), auth_string=auth_string) as stack:
        yield stack


def _status(stack: Stack, path: str, *, method: str = "GET", auth: str | None = None) -> int:
    """HTTP status of one raw API request, with Basic `auth` or no Authorization header at all."""
    request = urllib.request.Request(stack.api_url + path, method=method, data=b"{}" if method == "POST" else None)
    request.add_header("Content-Type", "application/json")
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _without_auth(stack: Stack, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in stack.env.items() if k != "PREFECT_API_AUTH_STRING"}
    return {**env, **extra}


def _client(stack: Stack) -> SyncPrefectClient:
    return SyncPrefectClient(stack.api_url, auth_string=stack.auth_string)


@pytest.mark.parametrize(
    ("auth", "expected"),
    [(None, 401), ("ckptflow:wrong", 401), ("not-basic-at-all", 401), ("right", 200)],
    ids=["no-header", "wrong-password", "garbage", "right"],
)
def test_the_api_refuses_requests_without_the_auth_string(auth_stack, auth, expected):
    auth = auth_stack.auth_string if auth == "right" else auth
    assert _status(auth_stack, "/deployments/filter", method="POST", auth=auth) == expected
    assert _status(auth_stack, "/work_pools/" + POOL, auth=auth) == expected


def test_health_is_open_and_the_ui_knows_where_the_api_is(auth_stack):
    """Probes need no credentials; the UI asks the browser for them (auth BASIC) and calls PREFECT_UI_API_URL."""
    assert _status(auth_stack, "/health") == 200
    ui = auth_stack.api_url.removesuffix("/api")
    with urllib.request.urlopen(f"{ui}/ui-settings", timeout=10) as response:
        settings = json.loads(response.read())
    assert settings["auth"] == "BASIC" and settings["api_url"] == auth_stack.api_url


def test_a_prefect_client_without_the_auth_string_gets_401(auth_stack):
    from prefect.exceptions import PrefectHTTPStatusError

    with SyncPrefectClient(auth_stack.api_url) as client:
        with pytest.raises(PrefectHTTPStatusError, match="401 Unauthorized"):
            client.read_deployment_by_name("finetune/finetune")


@pytest.mark.parametrize(
    ("command", "auth"),
    [
        (("bash", str(REPO / "deployments" / "deploy.sh")), None),
        ((str(BIN / "ckptflow"), "serve"), "ckptflow:wrong"),
    ],
    ids=["deploy.sh-without", "serve-with-a-wrong-one"],
)
def test_our_tools_exit_2_and_name_the_variable(auth_stack, command, auth):
    env = _without_auth(auth_stack, **({"PREFECT_API_AUTH_STRING": auth} if auth else {}))
    proc = subprocess.run(
        list(command), env=env, cwd=REPO, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    assert NAMES_THE_VARIABLE in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert auth_stack.auth_string not in proc.stdout + proc.stderr


def test_an_authenticated_worker_runs_the_finetune_deployment(auth_stack):
    assert "ckptflow-process" in auth_stack.deploy_output  # deploy.sh ran with the auth string
    with _client(auth_stack) as client:
        deployment = client.read_deployment_by_name("finetune/finetune")
        assert deployment.work_pool_name == POOL
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters=FINETUNE_PARAMETERS)
        flow_run = wait_final(client, flow_run.id, auth_stack)
        assert flow_run.state.is_completed(), flow_run.state
        assert flow_run.work_pool_name == POOL
    export = auth_stack.ckptflow_home / "exports" / RUN
    assert (export / "model.safetensors").is_file()
    worker_log = (auth_stack.logs / "worker.log").read_text()
    assert str(flow_run.id) in worker_log and auth_stack.auth_string not in worker_log


def test_ckptflow_serve_registers_both_deployments_on_the_authenticated_server(auth_stack):
    """After the pool's deployments are deleted, `ckptflow serve` (authenticated) registers both and serves them.
    Runs last. Running a served flow is covered by test_deployments.py; here the point is the credentials."""
    for name in ("finetune/finetune", "retrain/retrain"):
        deleted = auth_stack.prefect("deployment", "delete", name)
        assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    log = auth_stack.logs / "serve.log"
    env = {**auth_stack.env, "CKPTFLOW_HOME": str(auth_stack.ckptflow_home)}
    serve = start_process([str(BIN / "ckptflow"), "serve"], env, log)
    try:
        deadline = time.monotonic() + 120
        while "being served" not in log.read_text():
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        with _client(auth_stack) as client:
            served = {name: client.read_deployment_by_name(name) for name in ("finetune/finetune", "retrain/retrain")}
        assert all(d.work_pool_name is None for d in served.values())  # served by the process, not on the pool
        assert [s.schedule.cron for s in served["retrain/retrain"].schedules] == ["0 2 * * *"]
    finally:
        stop_process(serve)
    assert auth_stack.auth_string not in log.read_text()
