"""The thread that trains makes no Prefect API call for the live UI: progress and summary artifacts are
published by the watcher thread, and the progress still ends at 100% with every chunk task run listed."""

from __future__ import annotations

import threading

import pytest

pytestmark = pytest.mark.slow

# The artifact calls of tasks/reporting.py (the real ones run; each call also records its thread).
ARTIFACT_CALLS = ("create_progress_artifact", "update_progress_artifact", "create_table_artifact", "create_markdown_artifact")


def test_live_artifacts_are_published_off_the_training_thread(home, prefect_harness, monkeypatch):
    from flows.finetune import finetune
    from tasks import reporting

    calls: list[tuple[str, str]] = []
    for name in ARTIFACT_CALLS:
        real = getattr(reporting, name)

        def recording(*args, _name=name, _real=real, **kwargs):
            calls.append((_name, threading.current_thread().name))
            return _real(*args, **kwargs)

        monkeypatch.setattr(reporting, name, recording)

    state = finetune(run_name="quiet", overrides={"train": {"chunk_steps": 2}}, return_state=True)
    assert state.result()["status"] == "completed"

    main = threading.main_thread().name
    on_main = [name for name, thread in calls if thread == main]
    # The flow thread publishes only the run's final table and summary (the publish_artifacts task at the end).
    assert on_main == ["create_table_artifact", "create_markdown_artifact"], calls
    assert ("create_progress_artifact", "ckptflow-live-quiet") in calls, calls
    assert _progress("quiet-progress") == 100.0
    assert {"train_chunk[0] steps 0-2", "train_chunk[1] steps 2-4"} <= _task_run_names(state.state_details.flow_run_id)


def _progress(key: str) -> float:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        (artifact,) = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return float(artifact.data)


def _task_run_names(flow_run_id) -> set[str]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name for r in runs}
