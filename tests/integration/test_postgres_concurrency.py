"""The ledger on a real PostgreSQL server under stress: lost connections and two trainings at once.

Connections are really killed (`pg_terminate_backend`) and the database really refuses
connections (`ALLOW_CONNECTIONS false`) on the session's server (tests/postgres.py); an event
hook only chooses the instant. Two `ckptflow run` processes (each with Prefect's temporary
server) train two runs at once into one Postgres ledger.
"""

from __future__ import annotations

import subprocess
import time

import pytest
from psycopg import sql
from sqlalchemy import event
from sqlalchemy.engine import make_url

from ckptflow.errors import LedgerUnavailableError
from ckptflow.ledger import AttemptStatus, CheckpointState, Ledger, RunStatus

pytestmark = pytest.mark.slow


def _new_run(ledger: Ledger, name: str = "run-a"):
    return ledger.create_run(name, fingerprint="fp", config={}, base_model="builtin:tiny-gpt2", total_steps=8)


def _backend_pids(server, database: str) -> list[int]:
    with server.connect() as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (database,))
        return [pid for (pid,) in rows]


def _terminate(server, pids: list[int]) -> None:
    with server.connect() as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def _allow_connections(server, database: str, allowed: bool) -> None:
    """Open or close the database to new connections (as a server that is down would), killing the open ones."""
    with server.connect() as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS {}").format(sql.Identifier(database), sql.Literal(allowed)))
    if not allowed:
        _terminate(server, _backend_pids(server, database))


def test_connections_killed_between_calls_are_replaced(postgres_server, postgres_url):
    database = make_url(postgres_url).database
    with Ledger(postgres_url) as ledger:
        run = _new_run(ledger)
        killed = _backend_pids(postgres_server, database)
        assert killed, "the ledger keeps a pooled connection"
        _terminate(postgres_server, killed)
        ledger.begin_checkpoint(run.id, 2, "/x/checkpoint-2")  # the dead pooled connection fails its pre-ping
        assert not set(killed) & set(_backend_pids(postgres_server, database))
        assert [c.step for c in ledger.checkpoints(run.id)] == [2]


def _kill_once_at(ledger: Ledger, server, statement_prefix: str) -> list[str]:
    """Kill the ledger's own backend just before its first statement starting with `statement_prefix`."""
    fired: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        if not fired and statement.lstrip().upper().startswith(statement_prefix):
            fired.append(statement)
            _terminate(server, [conn.connection.dbapi_connection.info.backend_pid])

    event.listen(ledger._engine, "before_cursor_execute", before)  # noqa: SLF001 - only picks the instant
    return fired


@pytest.mark.parametrize(
    ("statement", "call", "check"),
    [
        (
            "UPDATE CHECKPOINTS",
            lambda led, run: led.commit_checkpoint(run.id, 2, epoch=1.0, metrics={"eval_loss": 1.0}, bytes=5, manifest_sha256="s"),
            lambda led, run: [(c.step, c.state) for c in led.checkpoints(run.id)] == [(2, CheckpointState.COMMITTED)],
        ),
        (
            "INSERT INTO ATTEMPTS",
            lambda led, run: led.start_attempt(run.id, chunk=0, start_step=0, end_step=4, resumed_from_step=None),
            lambda led, run: [(a.attempt, a.status) for a in led.attempts(run.id)] == [(1, AttemptStatus.RUNNING)],
        ),
        (
            "UPDATE LEASES",
            lambda led, run: led.take_lease(run.id, "new", ttl_seconds=0),
            lambda led, run: led.lease_holder(run.id) == "new" and led.current_fence(run.id, "new").token == 2,
        ),
    ],
    ids=["commit_checkpoint", "start_attempt", "take_lease"],
)
def test_a_connection_killed_during_a_call_is_retried_once_and_writes_once(postgres_server, postgres_url, statement, call, check):
    with Ledger(postgres_url) as ledger:
        run = _new_run(ledger)
        ledger.begin_checkpoint(run.id, 2, "/x/checkpoint-2")
        ledger.take_lease(run.id, "old")
        fired = _kill_once_at(ledger, postgres_server, statement)
        call(ledger, run)
        assert len(fired) == 1, "the hook killed the connection mid-call"
    with Ledger(postgres_url) as fresh:  # read back through new connections
        assert check(fresh, run)


def test_a_database_that_stays_away_fails_the_call_clearly_and_loses_nothing(postgres_server, postgres_url):
    database = make_url(postgres_url).database
    with Ledger(postgres_url) as ledger:
        run = _new_run(ledger)
        ledger.commit_checkpoint(run.id, 2, epoch=1.0, metrics={}, bytes=1, manifest_sha256="s", path="/x/checkpoint-2")
        _allow_connections(postgres_server, database, False)
        try:
            t0 = time.monotonic()
            with pytest.raises(LedgerUnavailableError) as refused:
                ledger.commit_checkpoint(run.id, 4, epoch=2.0, metrics={}, bytes=1, manifest_sha256="s", path="/x/checkpoint-4")
            waited = time.monotonic() - t0
        finally:
            _allow_connections(postgres_server, database, True)
        message = str(refused.value)
        assert "commit_checkpoint failed 7 times" in message and "CKPTFLOW_LEDGER_URL" in message
        assert "is not currently accepting connections" in message, message  # the server's own words
        assert postgres_server.password not in message  # the URL is masked
        assert 8 < waited < 60, waited
        # The server is back: the same Ledger works again, and what was committed before is there.
        assert [(c.step, c.state) for c in ledger.checkpoints(run.id)] == [(2, CheckpointState.COMMITTED)]
        ledger.commit_checkpoint(run.id, 4, epoch=2.0, metrics={}, bytes=1, manifest_sha256="s", path="/x/checkpoint-4")
        assert [c.step for c in ledger.checkpoints(run.id, [CheckpointState.COMMITTED])] == [2, 4]
        assert ledger.get_run_by_id(run.id).status is RunStatus.RUNNING


# -- two trainings at once ---------------------------------------------------------------------
RUN_NAMES = ("left", "right")


def test_two_ckptflow_runs_train_two_runs_into_one_postgres_ledger_at_once(home, postgres_url, tmp_path, s3, s3_remote):
    """The must-show: two real `ckptflow run` processes (each with its own Prefect temporary server) at once, on one
    Postgres ledger and one bucket."""
    import json

    remote_url, bucket = s3_remote
    from tests.drills import LAST_STEP, cli
    from tests.prefect_db import seed_prefect_home

    started = time.monotonic()
    procs = {
        name: cli(
            "run", "--run-name", name,
            home=home,
            env={
                "CKPTFLOW_LEDGER_URL": postgres_url,
                "CKPTFLOW_CHECKPOINT__REMOTE_URL": remote_url,
                "PREFECT_HOME": str(seed_prefect_home(tmp_path / f"prefect-{name}")),  # migrated: the server starts sooner
            },
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )
        for name in RUN_NAMES
    }
    outputs = {name: p.communicate(timeout=600) for name, p in procs.items()}
    elapsed = time.monotonic() - started
    for name, p in procs.items():
        assert p.returncode == 0, f"{name}: {outputs[name][1][-4000:]}"
    assert not (home / "ledger.db").exists()  # everything went to Postgres

    spans = []
    with Ledger(postgres_url, home=home) as ledger:
        for name in RUN_NAMES:
            run = ledger.get_run(name)
            assert run.status is RunStatus.COMPLETED and run.total_steps == LAST_STEP
            rows = ledger.checkpoints(run.id)
            committed = [c.step for c in rows if c.state is CheckpointState.COMMITTED]
            assert committed and committed[-1] == LAST_STEP, [(c.step, c.state) for c in rows]
            assert all((home / "runs" / name / "checkpoints" / f"checkpoint-{s}").is_dir() for s in committed)
            assert all(c.remote_at is not None for c in rows if c.state is CheckpointState.COMMITTED)  # in the bucket too
            keys = s3.keys(bucket, f"team/runs/{name}/checkpoints/")
            assert {k.split("/")[4] for k in keys} == {f"checkpoint-{s}" for s in committed}
            assert all(a.status is AttemptStatus.COMPLETED for a in ledger.attempts(run.id))
            assert ledger.lease_holder(run.id) is None and len(ledger.exports(run.id)) == 1
            spans.append((min(c.created_at for c in rows), max(c.created_at for c in rows)))
    # They really overlapped: each saved checkpoints while the other was training.
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans
    for name in RUN_NAMES:  # every committed checkpoint re-hashes clean, read through the Postgres ledger
        verify = cli("verify", name, "--json", home=home, env={"CKPTFLOW_LEDGER_URL": postgres_url, "CKPTFLOW_CHECKPOINT__REMOTE_URL": remote_url})
        assert verify.returncode == 0 and json.loads(verify.stdout)["ok"] is True, verify.stdout + verify.stderr[-2000:]
    print(f"two `ckptflow run`s on one Postgres ledger: both completed in {elapsed:.0f}s")


# -- a training attempt while the ledger goes away -----------------------------------------------
# How long the database stays closed: longer than one call's retries (~12 s), so that call fails.
OUTAGE_SECONDS = 16.0


def test_an_attempt_whose_ledger_goes_away_fails_cleanly_and_the_next_resumes(
    home, postgres_server, postgres_url, monkeypatch
):
    """Mid-chunk, at its first checkpoint write, the database refuses connections for longer than the retries:
    the attempt fails with LedgerUnavailableError; once it is back, the next attempt resumes from what was committed."""
    import threading

    from sqlalchemy.engine import Engine

    from ckptflow.planning import chunk_plan
    from tests.drills import DRILL_ENV, LAST_STEP
    from tests.helpers import committed_steps, job_for, run_chunk, settings_for

    database = make_url(postgres_url).database
    for key, value in {**DRILL_ENV, "CKPTFLOW_LEDGER_URL": postgres_url}.items():
        monkeypatch.setenv(key, value)
    settings = settings_for(home)
    chunks = chunk_plan(LAST_STEP, settings.train.chunk_steps, settings.checkpoint.save_steps)
    assert len(chunks) == 2

    # 1. Chunk 0 trains and commits normally.
    from ckptflow import pipeline

    opened = pipeline.open_or_create_run(settings, pipeline.prepare(settings), "outage", False)
    run_chunk(job_for(settings, opened.run.name, chunks[0]))
    before = committed_steps(settings, "outage")
    assert before and before[-1] == chunks[0].end_step

    # 2. Chunk 1: the database closes at its first checkpoint write and reopens OUTAGE_SECONDS later.
    outage: list[float] = []
    reopened = threading.Event()

    def close_once(conn, cursor, statement, parameters, context, executemany):
        if outage or not statement.lstrip().upper().startswith(("INSERT INTO CHECKPOINTS", "UPDATE CHECKPOINTS")):
            return
        outage.append(time.monotonic())
        _allow_connections(postgres_server, database, False)

        def reopen():
            _allow_connections(postgres_server, database, True)
            reopened.set()

        threading.Timer(OUTAGE_SECONDS, reopen).start()

    event.listen(Engine, "before_cursor_execute", close_once)
    try:
        with pytest.raises(LedgerUnavailableError, match="stayed unreachable"):
            run_chunk(job_for(settings, "outage", chunks[1]))
    finally:
        event.remove(Engine, "before_cursor_execute", close_once)
        assert reopened.wait(OUTAGE_SECONDS + 30)
    assert outage, "the database was closed during chunk 1"

    # 3. Nothing committed was lost; the next attempt resumes from it and finishes the run.
    assert committed_steps(settings, "outage")[: len(before)] == before
    result = run_chunk(job_for(settings, "outage", chunks[1]))
    assert result.resumed_from_step == before[-1]
    assert committed_steps(settings, "outage")[-1] == LAST_STEP
    with Ledger(postgres_url, home=home) as ledger:
        run = ledger.get_run("outage")
        chunk1 = [(a.attempt, a.status) for a in ledger.attempts(run.id) if a.chunk == 1]
    assert chunk1 == [(1, AttemptStatus.FAILED), (2, AttemptStatus.COMPLETED)], chunk1


@pytest.mark.parametrize("wrong", ["password", "database"])
def test_a_wrong_url_is_not_retried(postgres_url, wrong):
    """Waiting does not cure a wrong password or database name: the open fails at once, saying so."""
    from sqlalchemy.exc import OperationalError

    url = make_url(postgres_url)
    url = url.set(password="wrong") if wrong == "password" else url.set(database="no_such_database")
    t0 = time.monotonic()
    with pytest.raises(OperationalError, match="password authentication failed|does not exist"):
        Ledger(url.render_as_string(hide_password=False))
    assert time.monotonic() - t0 < 3
