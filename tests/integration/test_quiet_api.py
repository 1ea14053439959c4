"""What a chunk's training log sends to the Prefect API: every logging step's line exactly once, in few records."""

from __future__ import annotations

import logging
import re

import pytest

pytestmark = pytest.mark.slow

STEPS = 12
# A training step line as the UI shows it (ckptflow.logline), e.g. `step 3/12 (25%) · loss 6.3 · …`.
_STEP = re.compile(r"^step (\d+)/%d \(\d+%%\) · loss" % STEPS, re.MULTILINE)


@pytest.fixture
def ckptflow_logs_to_api():
    """Prefect's API handler on ckptflow's logger, as PREFECT_LOGGING_EXTRA_LOGGERS=ckptflow (the CLI's setting) attaches it."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger("ckptflow")
    handler = APILogHandler()
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)


def _logs(flow_run_id) -> list:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        return client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def test_each_logging_step_reaches_the_api_once_batched(home, prefect_harness, ckptflow_logs_to_api):
    from flows.finetune import finetune

    overrides = {
        "data": {"train": "builtin:demo-large"},
        "train": {"max_steps": STEPS, "chunk_steps": STEPS // 2, "logging_steps": 1},
        "checkpoint": {"save_steps": STEPS // 2, "eval_steps": STEPS // 2},
    }
    state = finetune(run_name="quiet", overrides=overrides, return_state=True)
    assert state.is_completed(), state.message
    logs = [log for log in _logs(state.state_details.flow_run_id) if log.name.startswith("ckptflow")]
    step_records = [log for log in logs if _STEP.search(log.message)]
    steps = [int(m) for log in step_records for m in _STEP.findall(log.message)]
    assert steps == list(range(1, STEPS + 1)), steps  # every logging step, once, in order: no rank or relay doubles
    assert len(step_records) < STEPS / 2, [log.message for log in step_records]  # batched, not one record per step
    assert all(log.task_run_id is not None for log in step_records)  # shown under their chunk's task run
    evals = [log.message for log in logs if "· eval loss" in log.message]
    assert len(evals) == 2 and not any(_STEP.search(m) for m in evals)  # eval lines stay records of their own
