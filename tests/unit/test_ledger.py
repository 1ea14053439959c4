"""Ledger: migrations, SQLite setup, round trips of every method, concurrency, leases, scale."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, insert, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from ckptflow.errors import LeaseLostError, RunLockedError
from ckptflow.ledger import (
    AttemptStatus,
    CheckpointState,
    Fence,
    Ledger,
    RunStatus,
    head_revision,
    holding,
)
from ckptflow.ledger.models import Base, Checkpoint, Lease, Run


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'nested' / 'dir' / 'ledger.db'}"


@pytest.fixture
def ledger(url):
    led = Ledger(url)
    yield led
    led.close()


@pytest.fixture
def any_ledger(ledger_url):
    """A ledger on each backend (tests/conftest.py `ledger_url`: a SQLite file, a real PostgreSQL database)."""
    led = Ledger(ledger_url)
    yield led
    led.close()


def _run(ledger, name="run-a", **kw):
    args = {"fingerprint": "fp", "config": {"train": {"seed": 42}}, "base_model": "builtin:tiny-gpt2", "total_steps": 8}
    args.update(kw)
    return ledger.create_run(name, **args)


def _aware_utc(ts: datetime) -> bool:
    return ts.tzinfo is not None and ts.utcoffset() == timedelta(0)


# -- schema / engine --------------------------------------------------------------------
def test_open_creates_parent_dir_and_migrates_to_head(ledger, tmp_path):
    assert (tmp_path / "nested" / "dir" / "ledger.db").is_file()
    assert head_revision() == "0005"
    assert ledger.current_revision() == head_revision()


def test_migration_creates_exactly_the_models_schema(ledger, url):
    engine = create_engine(url)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        insp = inspect(conn)
        assert set(insp.get_table_names()) == {"alembic_version", "runs", "checkpoints", "attempts", "exports", "leases"}
        indexes = {i["name"]: i["column_names"] for t in ("checkpoints", "attempts", "exports") for i in insp.get_indexes(t)}
        assert indexes["ix_checkpoints_run_state"] == ["run_id", "state"]
        assert indexes["ix_attempts_run_chunk"] == ["run_id", "chunk"]
        assert indexes["ix_exports_run_id"] == ["run_id"]
        uniques = [u["column_names"] for u in insp.get_unique_constraints("checkpoints")]
        assert ["run_id", "step"] in uniques
    engine.dispose()


def test_reopen_is_a_no_op_and_works_from_any_cwd(url, tmp_path, monkeypatch):
    Ledger(url).close()
    monkeypatch.chdir(tmp_path / "nested")
    led = Ledger(url)
    assert led.current_revision() == head_revision()
    led.close()


def test_sqlite_pragmas_on_every_connection(ledger):
    with ledger._engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_in_memory_url_works():
    led = Ledger("sqlite://")
    run = _run(led)
    assert led.get_run_by_id(run.id).name == "run-a"
    led.close()


# -- runs ---------------------------------------------------------------------------------
def test_run_round_trip(ledger):
    run = _run(ledger, config={"a": {"b": 1}})
    assert run.status is RunStatus.RUNNING
    assert run.config == {"a": {"b": 1}} and run.metrics == {}
    assert _aware_utc(run.created_at) and _aware_utc(run.updated_at)
    assert ledger.get_run("run-a") == run
    assert ledger.get_run_by_id(run.id) == run
    assert ledger.get_run("nope") is None
    with pytest.raises(KeyError):
        ledger.get_run_by_id(999)


def test_duplicate_run_name_is_value_error(ledger):
    _run(ledger)
    with pytest.raises(ValueError, match="run-a"):
        _run(ledger)


def test_list_runs_newest_first(ledger):
    names = [f"r{i}" for i in range(3)]
    for n in names:
        _run(ledger, n)
    assert [r.name for r in ledger.list_runs()] == names[::-1]


def test_status_metrics_and_rename(ledger):
    run = _run(ledger)
    _run(ledger, "taken")
    ledger.set_run_status(run.id, RunStatus.COMPLETED)
    ledger.update_run_metrics(run.id, {"eval_loss": 2.0, "base": {"eval_loss": 3.0}})
    merged = ledger.update_run_metrics(run.id, {"eval_loss": 1.5, "perplexity": 4.5})
    assert merged.metrics == {"eval_loss": 1.5, "base": {"eval_loss": 3.0}, "perplexity": 4.5}
    assert merged.status is RunStatus.COMPLETED
    assert merged.updated_at >= run.updated_at
    ledger.rename_run(run.id, "run-a@2026-11-25T10:00:00")
    assert ledger.get_run("run-a") is None
    assert ledger.get_run("run-a@2026-11-25T10:00:00").id == run.id
    with pytest.raises(ValueError, match="taken"):
        ledger.rename_run(run.id, "taken")


# -- checkpoints --------------------------------------------------------------------------
def test_checkpoint_lifecycle_round_trip(ledger):
    run = _run(ledger)
    begun = ledger.begin_checkpoint(run.id, 2, "/x/checkpoint-2")
    assert begun.state is CheckpointState.WRITING and begun.bytes == 0 and begun.manifest_sha256 is None
    assert _aware_utc(begun.created_at)
    done = ledger.commit_checkpoint(run.id, 2, epoch=0.5, metrics={"eval_loss": 1.25}, bytes=123, manifest_sha256="ab" * 32)
    assert (done.id, done.state, done.epoch, done.metrics, done.bytes) == (
        begun.id, CheckpointState.COMMITTED, 0.5, {"eval_loss": 1.25}, 123
    )
    assert ledger.get_checkpoint(run.id, 2) == done
    assert ledger.get_checkpoint(run.id, 3) is None


def test_begin_resets_an_existing_row(ledger):
    run = _run(ledger)
    ledger.begin_checkpoint(run.id, 6, "/x/checkpoint-6")
    ledger.mark_checkpoint(run.id, 6, CheckpointState.PARTIAL, "crash")
    again = ledger.begin_checkpoint(run.id, 6, "/y/checkpoint-6")
    assert (again.state, again.path, again.reason) == (CheckpointState.WRITING, "/y/checkpoint-6", None)
    assert len(ledger.checkpoints(run.id)) == 1


def test_commit_without_begin_creates_the_row(ledger):
    run = _run(ledger)
    ck = ledger.commit_checkpoint(
        run.id, 4, epoch=None, metrics={}, bytes=1, manifest_sha256="cd" * 32, path="/x/checkpoint-4"
    )
    assert ck.state is CheckpointState.COMMITTED and ck.path == "/x/checkpoint-4"
    with pytest.raises(ValueError, match="path"):
        ledger.commit_checkpoint(run.id, 5, epoch=None, metrics={}, bytes=1, manifest_sha256="x")


def test_checkpoints_sorted_numerically_and_filtered_by_state(ledger):
    run = _run(ledger)
    other = _run(ledger, "other")
    for step in (10, 2, 100, 4):
        ledger.commit_checkpoint(run.id, step, epoch=None, metrics={}, bytes=1, manifest_sha256="s", path=f"/c/checkpoint-{step}")
    ledger.begin_checkpoint(other.id, 2, "/o/checkpoint-2")
    ledger.mark_checkpoint(run.id, 4, CheckpointState.PRUNED, "retention: not among the 2 best")
    ledger.mark_checkpoint(run.id, 10, "corrupt", "sha differs")
    assert [c.step for c in ledger.checkpoints(run.id)] == [2, 4, 10, 100]
    assert [c.step for c in ledger.checkpoints(run.id, [CheckpointState.COMMITTED])] == [2, 100]
    assert [c.step for c in ledger.checkpoints(run.id, ["pruned", "corrupt"])] == [4, 10]
    pruned = ledger.get_checkpoint(run.id, 4)
    assert pruned.reason == "retention: not among the 2 best" and _aware_utc(pruned.pruned_at)
    assert ledger.get_checkpoint(run.id, 10).pruned_at is None
    with pytest.raises(KeyError):
        ledger.mark_checkpoint(run.id, 7, CheckpointState.CORRUPT)
    with pytest.raises(ValueError):
        ledger.mark_checkpoint(run.id, 2, "bogus")


def test_best_metrics_in_two_queries(ledger):
    a, b, c = _run(ledger, "a"), _run(ledger, "b"), _run(ledger, "c")
    for step, loss in ((2, 3.0), (4, 1.0), (6, 2.0)):
        ledger.commit_checkpoint(a.id, step, epoch=None, metrics={"eval_loss": loss}, bytes=1, manifest_sha256="s", path=f"/a/checkpoint-{step}")
    ledger.mark_checkpoint(a.id, 4, CheckpointState.PRUNED)
    ledger.commit_checkpoint(b.id, 2, epoch=None, metrics={}, bytes=1, manifest_sha256="s", path="/b/checkpoint-2")
    best = ledger.best_metrics()
    assert best[a.id] == {"committed": 2, "latest_step": 6, "best_step": 6, "best_value": 2.0, "metric": "eval_loss"}
    assert best[b.id] == {"committed": 1, "latest_step": 2, "best_step": None, "best_value": None, "metric": "eval_loss"}
    assert best[c.id]["committed"] == 0 and best[c.id]["latest_step"] is None
    assert ledger.best_metrics("eval_loss", greater_is_better=True)[a.id]["best_step"] == 2


# -- attempts -----------------------------------------------------------------------------
def test_attempts_round_trip(ledger):
    run = _run(ledger)
    ck = ledger.commit_checkpoint(run.id, 4, epoch=1.0, metrics={}, bytes=1, manifest_sha256="s", path="/c/checkpoint-4")
    a1 = ledger.start_attempt(run.id, chunk=1, start_step=4, end_step=8, resumed_from_step=4, prefect_flow_run_id="f-1", prefect_task_run_id="t-1")
    assert (a1.attempt, a1.resumed_from, a1.resumed_from_step, a1.status) == (1, ck.id, 4, AttemptStatus.RUNNING)
    assert (a1.prefect_flow_run_id, a1.prefect_task_run_id) == ("f-1", "t-1") and _aware_utc(a1.started_at)
    ledger.add_attempt_note(a1.id, "checkpoint-6 corrupt, resumed from checkpoint-4")
    ledger.add_attempt_note(a1.id, "second note")
    ledger.finish_attempt(a1.id, AttemptStatus.FAILED, "RuntimeError: boom")
    a2 = ledger.start_attempt(run.id, chunk=1, start_step=4, end_step=8, resumed_from_step=None)
    a0 = ledger.start_attempt(run.id, chunk=0, start_step=0, end_step=4, resumed_from_step=None)
    ledger.finish_attempt(a2.id, "completed")
    got = ledger.attempts(run.id)
    assert [(a.chunk, a.attempt) for a in got] == [(1, 1), (1, 2), (0, 1)]
    assert got[0].notes == "checkpoint-6 corrupt, resumed from checkpoint-4\nsecond note"
    assert (got[0].status, got[0].error) == (AttemptStatus.FAILED, "RuntimeError: boom")
    assert got[1].status is AttemptStatus.COMPLETED and _aware_utc(got[1].finished_at)
    assert got[1].resumed_from is None and a0.attempt == 1
    with pytest.raises(KeyError):
        ledger.finish_attempt(999, "failed")


# -- exports ------------------------------------------------------------------------------
def test_exports_round_trip(ledger):
    run, other = _run(ledger), _run(ledger, "other")
    ck = ledger.commit_checkpoint(run.id, 4, epoch=1.0, metrics={}, bytes=1, manifest_sha256="s", path="/c/checkpoint-4")
    ok = ledger.commit_checkpoint(other.id, 2, epoch=1.0, metrics={}, bytes=1, manifest_sha256="s", path="/o/checkpoint-2")
    e = ledger.record_export(run.id, checkpoint_id=ck.id, path="/e/run-a", merged=True, metrics={"eval_loss": 1.0})
    assert (e.step, e.merged, e.promoted, e.metrics) == (4, True, False, {"eval_loss": 1.0})
    ledger.record_export(other.id, checkpoint_id=ok.id, path="/e/other", merged=False, metrics={})
    ledger.set_promoted(e.id, True)
    assert [x.promoted for x in ledger.exports(run.id)] == [True]
    assert [x.run_id for x in ledger.exports()] == [run.id, other.id]
    with pytest.raises(KeyError):
        ledger.record_export(run.id, checkpoint_id=ok.id, path="/e", merged=True, metrics={})
    with pytest.raises(KeyError):
        ledger.set_promoted(999, True)


# -- leases -------------------------------------------------------------------------------
def test_live_holder_is_refused(any_ledger):
    ledger = any_ledger
    run = _run(ledger)
    ledger.acquire_lease(run.id, "flow-1")
    ledger.acquire_lease(run.id, "flow-1")  # re-acquire own lease: fine
    ledger.heartbeat(run.id, "flow-1")
    with pytest.raises(RunLockedError, match=r"flow-1.*pid \d+"):
        ledger.acquire_lease(run.id, "flow-2")
    ledger.release_lease(run.id, "flow-2")  # not the holder: no-op
    assert ledger.lease_holder(run.id) == "flow-1"
    ledger.release_lease(run.id, "flow-1")
    ledger.acquire_lease(run.id, "flow-2")
    assert ledger.lease_holder(run.id) == "flow-2"
    with pytest.raises(RunLockedError):
        ledger.heartbeat(run.id, "flow-1")


def test_dead_pid_holder_is_taken_over(any_ledger, ledger_url):
    ledger, url = any_ledger, ledger_url
    run = _run(ledger)
    code = f"from ckptflow.ledger import Ledger; Ledger({url!r}).acquire_lease({run.id}, 'child')"
    subprocess.run([sys.executable, "-c", code], check=True)  # acquires, exits, is reaped
    assert ledger.lease_holder(run.id) == "child"
    ledger.acquire_lease(run.id, "parent")
    assert ledger.lease_holder(run.id) == "parent"


def test_stale_heartbeat_is_taken_over(any_ledger):
    ledger = any_ledger
    run = _run(ledger)
    ledger.acquire_lease(run.id, "other-host-flow")
    with ledger._write.begin() as s:  # pretend it lives on another host and went silent
        s.execute(update(Lease).values(host="elsewhere", heartbeat_at=datetime.now(UTC) - timedelta(seconds=120)))
    with pytest.raises(RunLockedError):
        ledger.acquire_lease(run.id, "me", ttl_seconds=300)
    ledger.acquire_lease(run.id, "me", ttl_seconds=60)
    assert ledger.lease_holder(run.id) == "me"


# -- portable paths -------------------------------------------------------------------------
def _raw_paths(url: str, table: str) -> list[str]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = [r[0] for r in conn.execute(text(f"SELECT path FROM {table} ORDER BY id"))]
    engine.dispose()
    return rows


def test_paths_inside_the_home_are_stored_relative_and_read_absolute(tmp_path):
    home = tmp_path / "home"
    url = f"sqlite:///{home / 'ledger.db'}"
    with Ledger(url) as led:  # home = the SQLite file's directory
        run = _run(led)
        inside = home / "runs" / "run-a" / "checkpoints" / "checkpoint-2"
        ck = led.begin_checkpoint(run.id, 2, str(inside))
        led.record_export(run.id, checkpoint_id=ck.id, path=str(home / "exports" / "run-a"), merged=True, metrics={})
        led.record_export(run.id, checkpoint_id=ck.id, path=str(tmp_path / "elsewhere"), merged=True, metrics={})
        assert led.get_checkpoint(run.id, 2).path == str(inside)
        assert [e.path for e in led.exports(run.id)] == [str(home / "exports" / "run-a"), str(tmp_path / "elsewhere")]
    assert _raw_paths(url, "checkpoints") == ["runs/run-a/checkpoints/checkpoint-2"]
    assert _raw_paths(url, "exports") == ["exports/run-a", str(tmp_path / "elsewhere")]  # outside: stays absolute


def test_rows_follow_the_home_they_are_opened_with(tmp_path):
    """A ledger elsewhere than its home (CKPTFLOW_LEDGER_URL): paths are relative to the home given."""
    url = f"sqlite:///{tmp_path / 'db' / 'ledger.db'}"
    with Ledger(url, home=tmp_path / "old") as led:
        run = _run(led)
        led.begin_checkpoint(run.id, 4, str(tmp_path / "old" / "runs" / "r" / "checkpoints" / "checkpoint-4"))
    with Ledger(url, home=tmp_path / "new") as led:
        assert led.get_checkpoint(run.id, 4).path == str(tmp_path / "new" / "runs" / "r" / "checkpoints" / "checkpoint-4")


# -- fencing --------------------------------------------------------------------------------
def test_every_acquisition_increments_the_token(any_ledger):
    ledger = any_ledger
    run = _run(ledger)
    tokens = [ledger.take_lease(run.id, "a").fence.token]
    tokens.append(ledger.take_lease(run.id, "a").fence.token)  # own lease again: a new acquisition
    ledger.release_lease(run.id, "a")
    tokens.append(ledger.take_lease(run.id, "b").fence.token)  # after a release the token keeps growing
    assert tokens == [1, 2, 3]


def _stale_fence(ledger, run) -> Fence:
    """A fence whose lease another holder has since taken over (its heartbeat aged past the TTL)."""
    old = ledger.take_lease(run.id, "old").fence
    ledger.take_lease(run.id, "new", ttl_seconds=0)  # "old" has not heartbeat for > 0 s: taken over
    return old


FENCED_WRITES = {
    "begin_checkpoint": lambda led, run, f: led.begin_checkpoint(run.id, 6, "/x/checkpoint-6", fence=f),
    "commit_checkpoint": lambda led, run, f: led.commit_checkpoint(
        run.id, 2, epoch=None, metrics={}, bytes=1, manifest_sha256="s", fence=f
    ),
    "mark_checkpoint (prune)": lambda led, run, f: led.mark_checkpoint(run.id, 2, CheckpointState.PRUNED, "p", fence=f),
    "record_export": lambda led, run, f: led.record_export(
        run.id, checkpoint_id=led.get_checkpoint(run.id, 2).id, path="/e", merged=True, metrics={}, fence=f
    ),
    "set_run_status": lambda led, run, f: led.set_run_status(run.id, RunStatus.COMPLETED, fence=f),
    "update_run_metrics": lambda led, run, f: led.update_run_metrics(run.id, {"x": 1}, fence=f),
    "start_attempt": lambda led, run, f: led.start_attempt(
        run.id, chunk=0, start_step=0, end_step=2, resumed_from_step=None, fence=f
    ),
    "abandon_attempts": lambda led, run, f: led.abandon_attempts(run.id, "x", fence=f),
}


def _dump(url: str) -> list[tuple]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = [
            tuple(r)
            for t in ("runs", "checkpoints", "attempts", "exports")
            for r in conn.execute(text(f"SELECT * FROM {t} ORDER BY id"))
        ]
    engine.dispose()
    return rows


@pytest.mark.parametrize("write", list(FENCED_WRITES), ids=list(FENCED_WRITES))
def test_a_holder_whose_lease_was_taken_over_cannot_write(any_ledger, ledger_url, write):
    ledger, url = any_ledger, ledger_url
    run = _run(ledger)
    ledger.begin_checkpoint(run.id, 2, "/x/checkpoint-2")
    ledger.start_attempt(run.id, chunk=0, start_step=0, end_step=2, resumed_from_step=None)
    stale = _stale_fence(ledger, run)
    before = _dump(url)
    with pytest.raises(LeaseLostError, match="lost the lease"):
        FENCED_WRITES[write](ledger, run, stale)
    assert _dump(url) == before  # refused in the same transaction: nothing written
    current = ledger.current_fence(run.id, "new")
    FENCED_WRITES[write](ledger, run, current)  # the new holder writes fine


def test_the_fence_this_process_holds_applies_to_every_write(any_ledger):
    ledger = any_ledger
    run = _run(ledger)
    stale = _stale_fence(ledger, run)
    with holding(ledger.url, stale), pytest.raises(LeaseLostError):
        ledger.begin_checkpoint(run.id, 2, "/x/checkpoint-2")  # no fence= argument: the held one counts
    ledger.begin_checkpoint(run.id, 2, "/x/checkpoint-2")  # outside: an unfenced writer (no lease in use)


def test_heartbeat_with_an_old_token_fails_even_for_the_same_holder(any_ledger):
    ledger = any_ledger
    run = _run(ledger)
    first = ledger.take_lease(run.id, "me").fence
    ledger.take_lease(run.id, "me")
    with pytest.raises(LeaseLostError):
        ledger.heartbeat(run.id, "me", token=first.token)


def _age_heartbeat(url: str, run_id: int, seconds: float) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(update(Lease).where(Lease.run_id == run_id).values(heartbeat_at=datetime.now(UTC) - timedelta(seconds=seconds)))
    engine.dispose()


# Contenders per trial, and trials per backend (the must-show: >= 6 processes, >= 50 trials, one winner each).
RACERS = 6
RACE_TRIALS = 50


def _racer(url: str, run_id: int, holder: str, trials: int, barrier, results) -> None:
    """One contender, reused across trials: at each trial all racers leave the barrier together and take the lease."""
    led = Ledger(url)
    try:
        for trial in range(trials):
            barrier.wait(timeout=120)  # the parent made the lease stale; everyone goes at once
            try:
                results.put((trial, holder, led.take_lease(run_id, holder).fence.token))
            except RunLockedError:
                results.put((trial, holder, None))
            except Exception as exc:  # reported to the parent, which fails the test with it
                results.put((trial, holder, f"{type(exc).__name__}: {exc}"))
    finally:
        led.close()


@pytest.mark.slow
def test_processes_taking_over_one_stale_lease_at_once_have_exactly_one_winner(any_ledger, ledger_url):
    """Not timing: whoever wins the compare-and-swap owns token n+1; the others then see a live holder.

    The racers stay alive across trials (so a winner's pid is never dead), and every trial
    starts with the lease held by "stale", which stopped heartbeating an hour ago.
    """
    ledger, url = any_ledger, ledger_url
    run = _run(ledger)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(RACERS + 1), ctx.Queue()
    procs = [
        ctx.Process(target=_racer, args=(url, run.id, f"p{i}", RACE_TRIALS, barrier, results), daemon=True)
        for i in range(RACERS)
    ]
    for p in procs:
        p.start()
    outcomes, t0 = [], time.perf_counter()
    try:
        for trial in range(RACE_TRIALS):
            stale_token = ledger.take_lease(run.id, "stale", ttl_seconds=0).fence.token  # from the last winner
            _age_heartbeat(url, run.id, seconds=3600)
            barrier.wait(timeout=120)
            got = sorted((results.get(timeout=60) for _ in procs), key=lambda r: r[1])
            assert {t for t, _, _ in got} == {trial}, got
            winners = [(h, tok) for _, h, tok in got if tok is not None]
            outcomes.append((stale_token, winners, ledger.lease_holder(run.id)))
    finally:
        barrier.abort()  # racers still waiting (a failed trial) leave at once
        for p in procs:
            p.join(timeout=60)
    elapsed = time.perf_counter() - t0
    for trial, (stale_token, winners, holder) in enumerate(outcomes):
        assert len(winners) == 1, (trial, winners)
        assert winners[0] == (holder, stale_token + 1), (trial, winners, holder)
    assert len(outcomes) == RACE_TRIALS and [p.exitcode for p in procs] == [0] * RACERS
    print(f"lease race on {make_url(url).get_backend_name()}: {RACE_TRIALS} trials x {RACERS} processes, "
          f"one winner each, {elapsed:.1f}s")


def test_promotion_leaves_exactly_one_promoted_export(any_ledger):
    ledger = any_ledger
    run = _run(ledger)
    ck = ledger.commit_checkpoint(run.id, 4, epoch=1.0, metrics={}, bytes=1, manifest_sha256="s", path="/c/checkpoint-4")
    ids = [ledger.record_export(run.id, checkpoint_id=ck.id, path=f"/e/{i}", merged=True, metrics={}).id for i in range(3)]
    ledger.set_promoted(ids[0], True)
    with pytest.raises(IntegrityError):  # two champions: refused by the schema itself
        ledger.set_promoted(ids[1], True)
    for winner in (ids[2], ids[0], ids[0]):
        ledger.promote_export(winner)
        assert [e.id for e in ledger.exports() if e.promoted] == [winner]
    with pytest.raises(KeyError):
        ledger.promote_export(999)
    assert [e.id for e in ledger.exports() if e.promoted] == [ids[0]]


# -- concurrency ----------------------------------------------------------------------------
WRITES_PER_PROCESS = 300


def _writer(url: str, tag: str, start, errors) -> None:
    try:
        start.wait()
        led = Ledger(url)  # both processes open (and migrate) a fresh ledger at the same time
        run = led.create_run(f"run-{tag}", fingerprint=tag, config={}, base_model="m", total_steps=WRITES_PER_PROCESS)
        for step in range(1, WRITES_PER_PROCESS // 3 + 1):
            led.begin_checkpoint(run.id, step, f"/{tag}/checkpoint-{step}")
            led.commit_checkpoint(run.id, step, epoch=None, metrics={"eval_loss": 1.0 / step}, bytes=step, manifest_sha256="s")
            led.update_run_metrics(run.id, {"last": step})
            led.checkpoints(run.id, ["committed"])
        led.close()
    except Exception as exc:  # reported to the parent
        errors.put(f"{tag}: {type(exc).__name__}: {exc}")
        raise


def test_two_processes_write_concurrently_without_lock_errors(ledger_url):
    url = ledger_url
    ctx = multiprocessing.get_context("spawn")
    start, errors = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(url, tag, start, errors)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    for p in procs:
        p.join(timeout=240)
    failures = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert failures == [] and [p.exitcode for p in procs] == [0, 0]
    led = Ledger(url)
    n = WRITES_PER_PROCESS // 3
    for tag in ("a", "b"):
        run = led.get_run(f"run-{tag}")
        assert len(led.checkpoints(run.id, ["committed"])) == n and run.metrics == {"last": n}
    led.close()


# -- scale --------------------------------------------------------------------------------
def test_fast_at_100k_checkpoints_over_1000_runs(ledger):
    now = datetime.now(UTC)
    runs = [
        {"name": f"r{i}", "status": "running", "fingerprint": "f", "config": {}, "base_model": "m",
         "total_steps": 100, "metrics": {}, "created_at": now, "updated_at": now}
        for i in range(1000)
    ]
    with ledger._write.begin() as s:
        s.execute(insert(Run), runs)
        ids = [r.id for r in ledger_runs(s)]
        rows = [
            {"run_id": rid, "step": step, "epoch": None, "path": f"/r{rid}/checkpoint-{step}",
             "state": "committed" if step % 10 == 0 else "pruned", "metrics": {"eval_loss": 1.0 / step},
             "bytes": 1, "manifest_sha256": "s", "created_at": now, "pruned_at": None, "reason": None}
            for rid in ids for step in range(1, 101)
        ]
        s.execute(insert(Checkpoint), rows)
    target = ids[500]
    t0 = time.perf_counter()
    for _ in range(20):
        assert len(ledger.checkpoints(target, ["committed"])) == 10
        assert ledger.get_checkpoint(target, 50) is not None
    per_call = (time.perf_counter() - t0) / 40
    t0 = time.perf_counter()
    best = ledger.best_metrics()
    best_time = time.perf_counter() - t0
    assert len(best) == 1000 and best[target]["best_step"] == 100
    assert per_call < 0.05, f"checkpoint lookup took {per_call:.3f}s"
    assert best_time < 5.0, f"best_metrics took {best_time:.2f}s"
    with ledger._engine.connect() as conn:
        plan = " ".join(
            str(r[-1])
            for r in conn.execute(text("EXPLAIN QUERY PLAN SELECT * FROM checkpoints WHERE run_id = 5 AND state = 'committed' ORDER BY step"))
        )
    assert "USING INDEX" in plan and "SCAN checkpoints" not in plan.replace("USING INDEX", "")


def ledger_runs(session):
    from sqlalchemy import select

    return session.scalars(select(Run).order_by(Run.id)).all()
