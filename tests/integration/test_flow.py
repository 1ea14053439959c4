"""The Prefect flow `finetune` for real: tasks per chunk, retries that resume from the ledger."""

from __future__ import annotations

import json

import pytest
from ckptflow.ledger import AttemptStatus, Ledger, RunStatus

from tests.helpers import adapter_weights, max_abs_diff, settings_for, train_without_prefect

pytestmark = pytest.mark.slow


def test_retried_chunk_resumes_and_ends_bit_identical(home, prefect_harness, monkeypatch):
    from flows.finetune import finetune

    # Reference: the same run, uninterrupted, in one chunk.
    reference = settings_for(home, train={"chunk_steps": 4})
    ref_name = train_without_prefect(reference, "reference")

    # Chunks of 2 steps; the first attempt of chunk 1 raises at step 3 (after checkpoint-2 committed).
    # Retention keeps one checkpoint (plus the protected newest and best), so one gets pruned.
    overrides = {
        "train": {"chunk_steps": 2, "retry_delay_seconds": 0},
        "checkpoint": {"save_total_limit": 1},
        "fault": {"at_step": 3, "mode": "raise", "times": 1},
    }
    result = finetune(run_name="flaky", overrides=overrides)
    assert result["status"] == "completed"

    settings = settings_for(home, **overrides)
    ledger = Ledger(settings.ledger)
    run = ledger.get_run("flaky")
    attempts = [(a.chunk, a.attempt, a.status, a.resumed_from_step) for a in ledger.attempts(run.id)]
    assert run.status == RunStatus.COMPLETED
    ledger.close()
    assert attempts == [
        (0, 1, AttemptStatus.COMPLETED, None),
        (1, 1, AttemptStatus.FAILED, 2),
        (1, 2, AttemptStatus.COMPLETED, 2),
    ]
    diff = max_abs_diff(
        adapter_weights(reference.checkpoints_dir(ref_name) / "checkpoint-4"),
        adapter_weights(settings.checkpoints_dir("flaky") / "checkpoint-4"),
    )
    assert diff == 0.0
    assert (settings.export_dir("flaky") / "model.safetensors").is_file()

    # The checkpoint table artifact says what was kept or pruned, and why.
    rows = json.loads(_artifact("flaky-checkpoints").data)
    assert [(r["step"], r["kept"]) for r in rows] == [(2, "pruned"), (4, "kept")], rows
    assert all(r["why"] for r in rows) and rows[1]["is_best"]
    summary = _artifact("flaky-summary").data
    assert "- retries: 1" in summary and "| 1 | 2-4 | 2 | 1 |" in summary  # chunk 1: 2 attempts, 1 retry

    # Running the finished run again says so and trains nothing; its data comes from Prefect's cache.
    again = finetune(run_name="flaky", overrides=overrides, return_state=True)
    assert again.result()["already_completed"] is True
    assert _task_states(again.state_details.flow_run_id) == {"prepare_data": "Cached", "open_run": "Completed"}
    assert any((home / "prefect-results").iterdir())  # persisted under CKPTFLOW_HOME


def _artifact(key: str):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return artifact


def _task_states(flow_run_id) -> dict[str, str]:
    """{task name without Prefect's suffix: state name} of one flow run."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}
