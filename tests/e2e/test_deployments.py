"""End to end against a real Prefect server: deployments from deployments/prefect.yaml run by a process
worker; chunked task runs with a visible retry, artifacts with real content, the export on disk;
then `retrain` twice — the first promotes a champion, the second (same data) skips."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

from ckptflow.ledger import AttemptStatus, Ledger
from ckptflow.promotion import CHAMPION_FILE, SKIPPED_NO_NEW_DATA
from tests.e2e.conftest import (
    BIN,
    FLOW_RUN_TIMEOUT_S,
    POOL,
    REPO,
    start_process,
    stop_process,
    wait_final,
    wait_flow_runs_exited,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUN = "e2e"
# How soon an idle `ckptflow serve` must exit after SIGTERM (seconds): a systemd/k8s stop waits no longer.
# It pauses both deployments, then ends without interpreter teardown (fast_exit): 0.2 s measured, 1.6-5 s before.
SERVE_STOP_TIMEOUT_S = 5
# Chunks of 2 of the demo's 4 steps; the first attempt of chunk 1 (steps 2-4) fails at step 3.
FINETUNE_PARAMETERS = {
    "run_name": RUN,
    "overrides": {
        "train": {"chunk_steps": 2, "retry_delay_seconds": 0},
        "fault": {"at_step": 3, "mode": "raise", "times": 1},
    },
}


def _task_runs(client: SyncPrefectClient, flow_run_id: UUID) -> dict[str, object]:
    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r for r in runs}


def _artifacts(client: SyncPrefectClient, flow_run_id: UUID) -> dict[str, object]:
    of_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    found = client.read_artifacts(artifact_filter=of_run)
    # The newest version of each key (the summary and table are republished during the run, as it goes).
    return {a.key: a for a in sorted(found, key=lambda a: a.created)}


def _run_retrain(stack, client: SyncPrefectClient) -> object:
    """`prefect deployment run retrain/retrain --watch`, as the README says; returns the finished flow run."""
    done = stack.prefect("deployment", "run", "retrain/retrain", "--watch", "--watch-timeout", str(FLOW_RUN_TIMEOUT_S))
    match = re.search(r"UUID: ([0-9a-f-]{36})", done.stdout)
    assert done.returncode == 0 and match, done.stdout[-3000:] + done.stderr[-3000:]
    return client.read_flow_run(UUID(match.group(1)))


def test_finetune_deployment_retries_a_chunk_and_publishes_artifacts(stack):
    with SyncPrefectClient(stack.api_url) as client:
        deployment = client.read_deployment_by_name("finetune/finetune")
        assert deployment.work_pool_name == POOL
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]
        assert "FinetuneOverrides" in json.dumps(deployment.parameter_openapi_schema)

        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters=FINETUNE_PARAMETERS)
        flow_run = wait_final(client, flow_run.id, stack)
        assert flow_run.state.is_completed(), flow_run.state

        # One task run per chunk, named with its steps; chunk 1 ran twice (a retry) in ONE task run.
        tasks = _task_runs(client, flow_run.id)
        chunks = sorted(name for name in tasks if name.startswith("train_chunk"))
        assert chunks == ["train_chunk[0] steps 0-2", "train_chunk[1] steps 2-4"]
        retried = tasks["train_chunk[1] steps 2-4"]
        assert retried.run_count == 2 and retried.state.is_completed()
        history = [s.name for s in client.read_task_run_states(retried.id)]
        assert "AwaitingRetry" in history or "Retrying" in history, history
        assert tasks["train_chunk[0] steps 0-2"].run_count == 1

        # Artifacts, with stable per-run keys and real content.
        artifacts = _artifacts(client, flow_run.id)
        assert {f"{RUN}-checkpoints", f"{RUN}-summary", f"{RUN}-progress"} <= set(artifacts)
        rows = json.loads(artifacts[f"{RUN}-checkpoints"].data)
        assert [r["step"] for r in rows] == [2, 4]
        assert all(r["kept"] == "kept" and r["why"] and isinstance(r["eval_loss"], float) for r in rows)
        assert float(artifacts[f"{RUN}-progress"].data) == 100.0
        summary = artifacts[f"{RUN}-summary"].data
        assert re.search(r"\| eval loss \| \d+\.\d{4} \| \d+\.\d{4} \|", summary), summary[:2000]
        assert "- retries: 1" in summary and "![loss curve" in summary and "data:image/svg+xml;base64," in summary
        assert str(stack.ckptflow_home / "exports" / RUN) in summary
        assert f"/runs/task-run/{retried.id}" in summary

    # The export on disk; the ledger's attempts carry the Prefect flow and task run ids.
    export = stack.ckptflow_home / "exports" / RUN
    assert (export / "model.safetensors").is_file() and (export / "README.md").is_file()
    with Ledger(f"sqlite:///{stack.ckptflow_home / 'ledger.db'}") as ledger:
        attempts = ledger.attempts(ledger.get_run(RUN).id)
    assert [(a.chunk, a.attempt, a.status) for a in attempts] == [
        (0, 1, AttemptStatus.COMPLETED),
        (1, 1, AttemptStatus.FAILED),
        (1, 2, AttemptStatus.COMPLETED),
    ]
    assert {a.prefect_flow_run_id for a in attempts} == {str(flow_run.id)}
    assert [a.prefect_task_run_id for a in attempts[1:]] == [str(retried.id)] * 2


def test_retrain_promotes_then_skips_unchanged_data(stack):
    with SyncPrefectClient(stack.api_url) as client:
        deployment = client.read_deployment_by_name("retrain/retrain")
        (schedule,) = deployment.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "UTC", True)

        first = _run_retrain(stack, client)
        assert first.state.is_completed() and first.state.message.startswith("promote"), first.state
        pointer = json.loads((stack.ckptflow_home / "exports" / CHAMPION_FILE).read_text())
        assert pointer["run"].startswith("retrain-")
        assert (stack.ckptflow_home / "exports" / pointer["run"] / "model.safetensors").is_file()
        assert (stack.ckptflow_home / "exports" / "champion" / "model.safetensors").is_file()
        with Ledger(f"sqlite:///{stack.ckptflow_home / 'ledger.db'}") as ledger:
            promoted = [e for e in ledger.exports() if e.promoted]
        assert [e.id for e in promoted] == [pointer["export_id"]]

        second = _run_retrain(stack, client)
        assert second.state.is_completed() and second.state.name == "Skipped", second.state
        assert second.state.message.startswith(SKIPPED_NO_NEW_DATA)
        # Same data: prepare_data came from Prefect's cache, and nothing was trained.
        tasks = _task_runs(client, second.id)
        assert tasks and all(not name.startswith("train_chunk") for name in tasks)
        (prepare,) = [t for name, t in tasks.items() if name.startswith("prepare_data")]
        assert prepare.state.name == "Cached"
        decision = _artifacts(client, second.id)["retrain-decision"].data
        assert "skip" in decision and pointer["run"] in decision
        assert json.loads((stack.ckptflow_home / "exports" / CHAMPION_FILE).read_text()) == pointer

    # The UI is served by the same server (offline).
    with urllib.request.urlopen(stack.api_url.removesuffix("/api") + "/", timeout=10) as response:
        assert response.status == 200 and "<html" in response.read().decode().lower()


def test_ckptflow_serve_runs_both_flows_without_a_work_pool(stack):
    """`ckptflow serve` registers both deployments, runs what is triggered in its own process, and pauses
    them when stopped. It refuses while the same deployments run on the work pool. Runs last."""
    env = {**stack.env, "CKPTFLOW_HOME": str(stack.ckptflow_home)}
    refused = subprocess.run(
        [str(BIN / "ckptflow"), "serve"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert refused.returncode == 2 and "already deployed to a work pool" in refused.stderr, refused.stderr[-2000:]
    for name in ("finetune/finetune", "retrain/retrain"):
        deleted = stack.prefect("deployment", "delete", name)
        assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    log = stack.logs / "serve.log"
    serve = start_process([str(BIN / "ckptflow"), "serve"], env, log)
    try:
        with SyncPrefectClient(stack.api_url) as client:
            deadline = time.monotonic() + 120
            while "being served" not in log.read_text():
                assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            retrain_deployment = client.read_deployment_by_name("retrain/retrain")
            assert [s.schedule.cron for s in retrain_deployment.schedules] == ["0 2 * * *"]
            # The finished run `e2e` again: served, it completes at once ("already completed").
            finetune_deployment = client.read_deployment_by_name("finetune/finetune")
            flow_run = client.create_flow_run_from_deployment(finetune_deployment.id, parameters={"run_name": RUN})
            flow_run = wait_final(client, flow_run.id, stack)
            assert flow_run.state.is_completed(), flow_run.state
            assert str(flow_run.id) in log.read_text()  # run by the serve process
            tasks = {name.rsplit("-", 1)[0]: t.state.name for name, t in _task_runs(client, flow_run.id).items()}
            assert tasks == {"prepare_data": "Cached", "open_run": "Completed"}
        # Stopped as systemd or Kubernetes stop it, once idle: SIGTERM to the process, which exits soon and cleanly.
        wait_flow_runs_exited(serve)
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(timeout=SERVE_STOP_TIMEOUT_S) == 0, log.read_text()[-3000:]
    finally:
        stop_process(serve)
    with SyncPrefectClient(stack.api_url) as client:
        assert client.read_deployment_by_name("retrain/retrain").paused
