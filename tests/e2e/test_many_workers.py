"""Many workers, one ledger: two real `prefect worker` processes on the `ckptflow-process` pool, four
`finetune` flow runs submitted at once — two runs × two submissions of each run name.

Every run trains exactly once (one flow run writes it; its attempts never overlap), the duplicate
submission is refused by the lease with a clear message (or, arriving after the end, finds the run
completed), nothing says "database is locked", and each run's final adapter equals a solo run's."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from ckptflow.ledger import AttemptStatus, CheckpointState, Ledger, RunStatus
from ckptflow.ledger.models import Lease
from flows.finetune import SKIPPED
from tests.drills import DRILL_ENV, LAST_STEP
from tests.e2e.conftest import BIN, POOL, Stack, start_process, start_stack, stop_process, wait_final
from tests.helpers import adapter_weights, max_abs_diff, settings_for, train_without_prefect

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Two runs that differ in what shapes the weights (the seed), so each must match its own solo run.
SEEDS = {"alpha": 42, "beta": 7}
SUBMISSIONS_PER_RUN = 2
# Flow runs each worker runs at once: 2 workers × 2 = all four submissions start together.
WORKER_LIMIT = 2
WORKER_LOGS = ("worker.log", "worker-2.log")  # the stack's worker, the second one
# How long a final flow run's logs may take to reach the server (they are sent in batches).
LOGS_TIMEOUT_S = 30
# What a refused duplicate's flow run says (ckptflow.ledger.store._lease_in_use).
REFUSAL = "is already being trained by another process"


def _overrides(seed: int) -> dict:
    """The drills' small schedule (8 steps, chunks of 4, save every 2) as flow parameters, with this seed."""
    groups: dict = {"train": {"seed": seed, "retry_delay_seconds": 0}}
    for key, value in DRILL_ENV.items():
        group, field = key.removeprefix("CKPTFLOW_").lower().split("__")
        groups.setdefault(group, {})[field] = int(value) if value.isdigit() else value  # typed, as the API checks
    return groups


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory) -> Iterator[Stack]:
    """The e2e stack (server, pool, deployments, one worker) plus a second worker on the same pool and home;
    each runs at most WORKER_LIMIT flow runs at a time, so the four submissions are shared between them."""
    limit = ("--limit", str(WORKER_LIMIT))
    with start_stack(tmp_path_factory.mktemp("many-workers"), worker_args=limit) as stack:
        env = {**stack.env, "CKPTFLOW_HOME": str(stack.ckptflow_home)}
        worker = [str(BIN / "prefect"), "worker", "start", "--pool", POOL, *limit]
        second = start_process(worker, env, stack.logs / WORKER_LOGS[1])
        try:
            yield stack
        finally:
            stop_process(second)


def _flow_run_logs(client: SyncPrefectClient, flow_run_id: UUID) -> str:
    """The flow run's log messages, once its last one ("Finished in state …") reached the server."""
    deadline = time.monotonic() + LOGS_TIMEOUT_S
    while True:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        text = "\n".join(entry.message for entry in logs)
        if "Finished in state" in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def _solo_final_adapter(home: Path, name: str, seed: int) -> dict:
    """The final adapter of the same settings trained alone, without Prefect, in a home of its own."""
    settings = settings_for(home, **_overrides(seed))
    train_without_prefect(settings, name)
    return adapter_weights(settings.checkpoints_dir(name) / f"checkpoint-{LAST_STEP}")


def test_four_submissions_on_two_workers_train_each_run_exactly_once(two_workers, home):
    stack = two_workers
    with SyncPrefectClient(stack.api_url) as client:
        deployment = client.read_deployment_by_name("finetune/finetune")
        submitted = [
            (name, client.create_flow_run_from_deployment(
                deployment.id, parameters={"run_name": name, "overrides": _overrides(seed)}
            ).id)
            for _ in range(SUBMISSIONS_PER_RUN)
            for name, seed in SEEDS.items()
        ]
        solo = {name: _solo_final_adapter(home, name, seed) for name, seed in SEEDS.items()}  # meanwhile
        finished = [(name, wait_final(client, flow_run_id, stack)) for name, flow_run_id in submitted]
        logs = {fr.id: _flow_run_logs(client, fr.id) for _, fr in finished}

    outputs = {log: (stack.logs / log).read_text() for log in WORKER_LOGS}
    for log, output in outputs.items():
        assert "database is locked" not in output and "Traceback" not in output, output[-5000:]
        # Both workers ran flow runs (the --limit shares the four between them).
        assert any(f"Flow run {fr.name!r} submitted to infrastructure" in output for _, fr in finished), log
    for _, fr in finished:
        assert "database is locked" not in logs[fr.id] and "Traceback" not in logs[fr.id], logs[fr.id][-5000:]

    refused = 0
    with Ledger(f"sqlite:///{stack.ckptflow_home / 'ledger.db'}") as ledger:
        for name in SEEDS:
            run = ledger.get_run(name)
            assert run.status == RunStatus.COMPLETED
            attempts = ledger.attempts(run.id)
            # One flow run trained it: every attempt is its, each chunk once, one after the other.
            writers = {a.prefect_flow_run_id for a in attempts}
            assert len(writers) == 1, writers
            assert [(a.chunk, a.attempt, a.status) for a in attempts] == [
                (0, 1, AttemptStatus.COMPLETED),
                (1, 1, AttemptStatus.COMPLETED),
            ]
            assert attempts[0].finished_at <= attempts[1].started_at
            saved = ledger.checkpoints(run.id)
            assert [c.step for c in saved] == [2, 4, 6, 8]  # every save recorded, by the trainer's attempts
            assert all(attempts[0].started_at <= c.created_at <= attempts[-1].finished_at for c in saved)
            assert [c.step for c in ledger.checkpoints(run.id, [CheckpointState.COMMITTED])] == [6, 8]
            assert len(ledger.exports(run.id)) == 1  # evaluated and exported once
            with ledger._read() as s:  # noqa: SLF001 - the lease row itself
                lease = s.get(Lease, run.id)
            assert (lease.token, lease.holder) == (1, "")  # one acquisition ever, released

            (trainer, duplicate) = sorted(
                (fr for n, fr in finished if n == name), key=lambda fr: str(fr.id) not in writers
            )
            assert str(trainer.id) in writers and trainer.state.is_completed(), trainer.state
            assert trainer.state.name == "Completed" and duplicate.state.is_completed(), duplicate.state
            if duplicate.state.name == SKIPPED:  # it came while the run trained: refused by the lease
                assert REFUSAL in duplicate.state.message and repr(name) in duplicate.state.message
                assert duplicate.start_time < trainer.end_time
                refused += 1
            else:  # it came after the end: a no-op
                assert "already completed" in logs[duplicate.id]

            final = adapter_weights(stack.ckptflow_home / "runs" / name / "checkpoints" / f"checkpoint-{LAST_STEP}")
            assert max_abs_diff(final, solo[name]) == 0.0
    assert refused >= 1  # the four really ran at once: a duplicate met its run training
