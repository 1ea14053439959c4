"""The Prefect flow `finetune` for real: tasks per chunk, retries that resume from the ledger."""

from __future__ import annotations

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
    overrides = {
        "train": {"chunk_steps": 2, "retry_delay_seconds": 0},
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

    # Running the finished run again says so and trains nothing.
    again = finetune(run_name="flaky", overrides=overrides)
    assert again["already_completed"] is True
