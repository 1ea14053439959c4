"""Several `ckptflow run` processes (the real flow) on one SQLite ledger: two runs train at once;
one run never has two writers."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

import pytest
from ckptflow.errors import RunLockedError
from ckptflow.ledger import AttemptStatus, CheckpointState, Ledger, RunStatus
from ckptflow.ledger.models import Lease
from ckptflow.ledger.store import LEASE_HEARTBEAT_SECONDS, LEASE_TTL_SECONDS
from ckptflow.lease import hold_lease
from sqlalchemy import update

from tests.drills import Driver, Watcher, cli, full_verify, pause_env

pytestmark = pytest.mark.slow

# Many small steps, a save + eval + prune at every one of them: lots of short ledger writes.
BUSY = {
    "CKPTFLOW_TRAIN__MAX_STEPS": "16",
    "CKPTFLOW_TRAIN__CHUNK_STEPS": "4",
    "CKPTFLOW_CHECKPOINT__SAVE_STEPS": "1",
    "CKPTFLOW_CHECKPOINT__EVAL_STEPS": "1",
}


def _ledger(home) -> Ledger:
    return Ledger(f"sqlite:///{(home / 'ledger.db').resolve()}")


def test_two_runs_training_at_once_share_the_sqlite_ledger(home):
    # Each run holds still mid-run (after step 8) for a few seconds: the two overlap whichever starts first.
    drivers = [Driver(home, name, BUSY | pause_env("step-end", 8, seconds=8)) for name in ("left", "right")]
    codes = [d.wait() for d in drivers]
    outputs = [d.output() for d in drivers]
    for code, out in zip(codes, outputs):
        assert code == 0, out
        assert "database is locked" not in out
    with _ledger(home) as ledger:
        for name in ("left", "right"):
            run = ledger.get_run(name)
            assert run.status == RunStatus.COMPLETED
            assert [c.step for c in ledger.checkpoints(run.id)] == list(range(1, 17))  # every save recorded
            assert all(a.status == AttemptStatus.COMPLETED for a in ledger.attempts(run.id))
            assert len(ledger.checkpoints(run.id, [CheckpointState.COMMITTED])) <= 3
            assert full_verify(home, name) == {}
    # The two processes really overlapped: each committed checkpoints while the other was training.
    spans = []
    with _ledger(home) as ledger:
        for name in ("left", "right"):
            rows = ledger.checkpoints(ledger.get_run(name).id)
            spans.append((min(r.created_at for r in rows), max(r.created_at for r in rows)))
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1]


def test_second_writer_on_the_same_run_is_refused_before_training(home):
    watcher = Watcher(home, "held")
    holder = Driver(home, "held", pause_env("step-end", 1))
    try:
        before = watcher.wait_for(lambda s: s.lease is not None and s.running(0) is not None, holder, "lease held")

        # 1. `ckptflow run` on the same run: exit 2, says who holds it, trains nothing.
        second = cli("run", "--run-name", "held", home=home)
        assert second.returncode == 2, second.stderr[-3000:]
        assert "already being trained by another process" in second.stderr
        assert f"pid {holder.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert "Beginning flow run" not in second.stderr  # refused before Prefect (and any training) started

        # 2. A second forked `ckptflow run` (Prefect already imported, as in `ckptflow serve`) is refused the same way.
        third = Driver(home, "held")
        assert third.wait() == 2 and "already being trained" in third.output()

        after = watcher.state()
        assert after.attempts == before.attempts and after.rows == before.rows
        assert after.lease == before.lease and holder.alive()
    finally:
        holder.kill()
        watcher.close()


def test_the_flow_itself_refuses_a_run_whose_lease_is_held(home):
    """The authoritative check (two `ckptflow run` may both pass the CLI's early one): the flow's lease."""
    from ckptflow.errors import RunLockedError
    from flows.finetune import finetune
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.drills import DRILL_ENV, session_server

    watcher = Watcher(home, "held")
    holder = Driver(home, "held", pause_env("step-end", 1))
    overrides: dict = {}
    for key, value in DRILL_ENV.items():
        group, field = key.removeprefix("CKPTFLOW_").lower().split("__")
        overrides.setdefault(group, {})[field] = value
    try:
        before = watcher.wait_for(lambda s: s.lease is not None and s.running(0) is not None, holder, "lease held")
        with temporary_settings({PREFECT_API_URL: session_server().api_url}):  # the drills' server, in this process
            with pytest.raises(RunLockedError, match="already being trained"):
                finetune(run_name="held", overrides=overrides)
            APILogWorker.drain_all()  # now, while the session's server still runs (not at interpreter exit)
        after = watcher.state()
        assert after.attempts == before.attempts and after.rows == before.rows and after.lease == before.lease
    finally:
        holder.kill()
        watcher.close()


def test_lease_heartbeats_from_a_thread_while_the_holder_is_busy(home):
    assert LEASE_HEARTBEAT_SECONDS <= LEASE_TTL_SECONDS / 3
    with _ledger(home) as ledger:
        run = ledger.create_run("r", fingerprint="f", config={}, base_model="m", total_steps=1)

        def heartbeat_at() -> datetime:
            with ledger._read() as s:  # noqa: SLF001 - reading the lease row directly
                return s.get(Lease, run.id).heartbeat_at

        with hold_lease(ledger.url, run.id, "me", heartbeat_seconds=0.05):
            first = heartbeat_at()
            time.sleep(0.5)  # a slow training step: the main thread does nothing for the lease
            assert heartbeat_at() > first
        assert ledger.lease_holder(run.id) is None


def test_stalled_holder_loses_the_lease_and_is_fenced(home):
    with _ledger(home) as ledger:
        run = ledger.create_run("r", fingerprint="f", config={}, base_model="m", total_steps=1)
        ledger.acquire_lease(run.id, "stalled")  # pid alive (ours), but no heartbeat for longer than the TTL
        with ledger._write.begin() as s:  # noqa: SLF001
            s.execute(update(Lease).values(heartbeat_at=datetime.now(UTC) - timedelta(seconds=LEASE_TTL_SECONDS + 5)))
        assert "no heartbeat" in ledger.acquire_lease(run.id, "new")
        with pytest.raises(RunLockedError):
            ledger.heartbeat(run.id, "stalled")  # its next heartbeat fails: it stops training

        ledger.release_lease(run.id, "new")
        ledger.acquire_lease(run.id, "dead")
        with ledger._write.begin() as s:  # noqa: SLF001
            s.execute(update(Lease).values(pid=2**22 + 12345))  # no such process on this host
        assert "its process is gone" in ledger.acquire_lease(run.id, "next")
        assert os.getpid() != 2**22 + 12345
