"""The ledger on a real PostgreSQL 15 server (tests/postgres.py), side by side with SQLite.

Each ledger test runs on both backends with a fresh database: the Alembic migrations create the
schema, and the same calls give the same records. The CLI tests train one real run into a
Postgres ledger (no Prefect) and read it back with `ckptflow … --json` through CKPTFLOW_LEDGER_URL.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from ckptflow.ledger import CheckpointState, Ledger, RunStatus, head_revision
from ckptflow.ledger.models import Base

pytestmark = pytest.mark.slow

LEDGER_TABLES = {"runs", "checkpoints", "attempts", "exports", "alembic_version"}


def _new_run(ledger: Ledger, name: str = "run-a"):
    return ledger.create_run(
        name, fingerprint="fp", config={"train": {"seed": 42}}, base_model="builtin:tiny-gpt2", total_steps=4
    )


def _commit(ledger: Ledger, run_id: int, step: int, metrics: dict):
    ledger.begin_checkpoint(run_id, step, f"runs/run-a/checkpoints/checkpoint-{step}")
    return ledger.commit_checkpoint(run_id, step, epoch=step / 2, metrics=metrics, bytes=100 * step, manifest_sha256="ab" * 32)


# -- the test server itself ----------------------------------------------------------------
def test_server_listens_on_loopback_and_wants_a_password(postgres_server):
    import psycopg

    assert make_url(postgres_server.url).host == "127.0.0.1"
    with postgres_server.connect(superuser=True) as conn:
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SHOW server_version_num").fetchone()[0].startswith("15")
        host_rules = conn.execute("SELECT DISTINCT auth_method FROM pg_hba_file_rules WHERE type = 'host'").fetchall()
        assert host_rules == [("scram-sha-256",)]
        role = conn.execute(
            "SELECT rolsuper, rolcreatedb, starts_with(rolpassword, 'SCRAM-SHA-256$') FROM pg_authid WHERE rolname = %s",
            (postgres_server.user,),
        ).fetchone()
        assert role == (False, True, True)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host="127.0.0.1", port=postgres_server.port, user=postgres_server.user, password="wrong", dbname="postgres"
        )


def test_each_test_gets_its_own_empty_database(postgres_server, postgres_url):
    other = postgres_server.create_database()
    try:
        assert make_url(other).database != make_url(postgres_url).database
        for url in (postgres_url, other):
            engine = create_engine(url)
            try:
                with engine.connect() as conn:
                    assert inspect(conn).get_table_names() == []
            finally:
                engine.dispose()
    finally:
        postgres_server.drop_database(make_url(other).database)


def test_a_stopped_server_leaves_no_process_and_no_directory():
    import psutil

    from tests.postgres import postgres_server

    with postgres_server() as server:
        root = server.root
        postmaster = psutil.Process(int((root / "data" / "postmaster.pid").read_text().split()[0]))
        family = [postmaster, *postmaster.children(recursive=True)]
        assert len(family) > 1 and str(root) in " ".join(postmaster.cmdline())
    assert not root.exists()
    _, alive = psutil.wait_procs(family, timeout=10)
    assert alive == []


def test_missing_server_binaries_fail_with_what_to_install(monkeypatch, tmp_path):
    from tests.postgres import PostgresUnavailable, postgres_server

    monkeypatch.setenv("POSTGRES_BIN_DIR", str(tmp_path))
    with pytest.raises(PostgresUnavailable, match=r"apt-get install -y postgresql-15.*POSTGRES_BIN_DIR"):
        with postgres_server():
            pass


# -- schema ------------------------------------------------------------------------------
def test_opening_a_fresh_database_migrates_it_to_head(ledger_url):
    with Ledger(ledger_url) as ledger:
        assert ledger.current_revision() == head_revision()
    engine = create_engine(ledger_url)
    try:
        with engine.connect() as conn:
            assert LEDGER_TABLES <= set(inspect(conn).get_table_names())
            # The migrations build exactly the ORM models' schema on this backend.
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    finally:
        engine.dispose()
    with Ledger(ledger_url) as again:  # already at head: opening again changes nothing
        assert again.current_revision() == head_revision()


def test_processes_opening_one_fresh_database_at_once_all_succeed(ledger_url):
    """Four processes race to create the schema; every one opens the ledger, the schema is made once."""
    code = "import sys; from ckptflow.ledger import Ledger; Ledger(sys.argv[1]).close()"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, ledger_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [code for code, _ in results] == [0] * 4, "\n".join(err[-1500:] for _, err in results)
    with Ledger(ledger_url) as ledger:
        assert ledger.current_revision() == head_revision()


# -- round trips -----------------------------------------------------------------------------
def test_run_checkpoint_export_round_trip(ledger_url):
    with Ledger(ledger_url) as ledger:
        run = _new_run(ledger)
        assert (run.status, run.config, run.total_steps) == (RunStatus.RUNNING, {"train": {"seed": 42}}, 4)
        with pytest.raises(ValueError, match="already exists"):
            _new_run(ledger)

        writing = ledger.begin_checkpoint(run.id, 2, "runs/run-a/checkpoints/checkpoint-2")
        assert writing.state is CheckpointState.WRITING
        first = ledger.commit_checkpoint(
            run.id, 2, epoch=1.0, metrics={"eval_loss": 2.5}, bytes=200, manifest_sha256="ab" * 32
        )
        _commit(ledger, run.id, 4, {"eval_loss": 2.25})
        ledger.mark_checkpoint(run.id, 2, CheckpointState.PRUNED, reason="retention: not among the 1 best")
        assert [(c.step, c.state, c.metrics) for c in ledger.checkpoints(run.id)] == [
            (2, CheckpointState.PRUNED, {"eval_loss": 2.5}),
            (4, CheckpointState.COMMITTED, {"eval_loss": 2.25}),
        ]
        assert ledger.get_checkpoint(run.id, 2).pruned_at is not None
        assert first.created_at.utcoffset() == timedelta(0)

        best = ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED])[0]
        export = ledger.record_export(
            run.id, checkpoint_id=best.id, path="exports/run-a", merged=True, metrics={"eval_loss": 2.25}
        )
        ledger.set_promoted(export.id, True)
        # (SQLite resolves the relative path against the cwd, outside its home: stored absolute.)
        assert [(e.step, e.path.endswith("exports/run-a"), e.merged, e.promoted) for e in ledger.exports(run.id)] == [
            (4, True, True, True)
        ]

        ledger.set_run_status(run.id, RunStatus.COMPLETED)
        _new_run(ledger, "run-b")
        assert [(r.name, r.status) for r in ledger.list_runs()] == [
            ("run-b", RunStatus.RUNNING),
            ("run-a", RunStatus.COMPLETED),
        ]
        summary = ledger.best_metrics()[run.id]
        assert (summary["committed"], summary["latest_step"], summary["best_step"]) == (1, 4, 4)


def test_nan_and_inf_metrics_are_stored_and_read_back(ledger_url):
    """Postgres `json` rejects the bare NaN/Infinity tokens Python's json writes: the ledger tags them instead."""
    url = ledger_url
    diverged = {"eval_loss": math.nan, "grad_norm": math.inf, "delta": -math.inf, "loss": 1.5}
    with Ledger(url) as ledger:
        run = _new_run(ledger)
        _commit(ledger, run.id, 2, diverged)
        ledger.update_run_metrics(run.id, {"base_eval_loss": math.nan})
    with Ledger(url) as reopened:  # a fresh engine: the values come from the database, not a session cache
        (ckpt,) = reopened.checkpoints(run.id)
        metrics = ckpt.metrics
        assert math.isnan(metrics["eval_loss"]) and metrics["loss"] == 1.5
        assert (metrics["grad_norm"], metrics["delta"]) == (math.inf, -math.inf)
        assert math.isnan(reopened.get_run_by_id(run.id).metrics["base_eval_loss"])
        assert reopened.best_metrics()[run.id]["best_step"] is None  # NaN never counts as the best
    # Stored as valid JSON: finite values plain, non-finite ones as tagged objects.
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            raw = conn.execute(text("SELECT metrics FROM checkpoints")).scalar_one()
    finally:
        engine.dispose()
    stored = raw if isinstance(raw, dict) else json.loads(raw)  # psycopg decodes json, sqlite3 returns text
    assert stored == {
        "eval_loss": {"$float": "nan"}, "grad_norm": {"$float": "inf"}, "delta": {"$float": "-inf"}, "loss": 1.5
    }


def test_bare_nan_tokens_written_by_older_versions_still_read_back(tmp_path):
    """SQLite ledgers written before the tagging hold Python's bare NaN/Infinity tokens; they still decode."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with Ledger(url) as ledger:
        run = _new_run(ledger)
        _commit(ledger, run.id, 2, {"loss": 1.5})
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("""UPDATE checkpoints SET metrics = '{"eval_loss": NaN, "g": -Infinity, "loss": 1.5}'"""))
    engine.dispose()
    with Ledger(url) as ledger:
        metrics = ledger.checkpoints(run.id)[0].metrics
    assert math.isnan(metrics["eval_loss"]) and (metrics["g"], metrics["loss"]) == (-math.inf, 1.5)


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ({"a": 1.0, "b": [1, 2]}, {"a": 1.0, "b": [1, 2]}),  # finite: stored unchanged (no migration)
        ({"a": math.inf, "n": {"m": [-math.inf]}}, {"a": {"$float": "inf"}, "n": {"m": [{"$float": "-inf"}]}}),
        ({"s": "nan", "t": {"$float": "x"}}, {"s": "nan", "t": {"$float": "x"}}),  # strings and odd tags stay as they are
    ],
)
def test_nonfinite_tagging_round_trips(value, stored):
    from ckptflow.ledger.models import FiniteJSON

    column = FiniteJSON()
    assert column.process_bind_param(value, None) == stored
    assert column.process_result_value(stored, None) == value


# -- the CLI on a Postgres ledger ---------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_on_postgres(postgres_server, tmp_path_factory):
    """One finished demo run `pg` whose ledger is a Postgres database (trained without Prefect)."""
    from tests.helpers import finish_without_prefect, settings_for, train_without_prefect

    url = postgres_server.create_database()
    home = tmp_path_factory.mktemp("pg-cli") / "home"
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("CKPTFLOW_")]:
            mp.delenv(key)
        mp.setenv("CKPTFLOW_HOME", str(home))
        mp.setenv("CKPTFLOW_LEDGER_URL", url)
        settings = settings_for(home)
        train_without_prefect(settings, "pg")
        finish_without_prefect(settings, "pg")
    return home, url


def _cli(home, url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTFLOW_")}
    env.update(CKPTFLOW_HOME=str(home), CKPTFLOW_LEDGER_URL=url)
    return subprocess.run(
        [sys.executable, "-m", "ckptflow.cli", *args],
        env=env, cwd=home.parent, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )


def test_runs_and_checkpoints_json_read_the_postgres_ledger(trained_on_postgres):
    home, url = trained_on_postgres
    assert not (home / "ledger.db").exists()  # everything went to Postgres

    runs = _cli(home, url, "runs", "--json")
    assert runs.returncode == 0, runs.stderr
    rows = json.loads(runs.stdout)
    assert [(r["name"], r["status"], r["last_step"], r["total_steps"]) for r in rows] == [("pg", "completed", 4, 4)]
    assert rows[0]["best_step"] in (2, 4) and rows[0]["best_metric"] is not None

    checkpoints = _cli(home, url, "checkpoints", "pg", "--json")
    assert checkpoints.returncode == 0, checkpoints.stderr
    assert [(c["step"], c["state"]) for c in json.loads(checkpoints.stdout)] == [(2, "committed"), (4, "committed")]

    verify = _cli(home, url, "verify", "pg", "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"] is True, verify.stdout + verify.stderr


def test_plan_with_a_postgres_ledger_url(trained_on_postgres):
    home, url = trained_on_postgres
    plan = _cli(home, url, "plan", "--at", "3", "--json")
    assert plan.returncode == 0, plan.stderr
    document = json.loads(plan.stdout)
    assert document["total_steps"] == 4 and document["at"]["resume_from"] == 2
