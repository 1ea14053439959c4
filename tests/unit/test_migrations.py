"""Alembic upgrades of real ledgers: a database made by revision 0001 (absolute paths, as the
code of that time wrote them) opened by today's code."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from ckptflow.ledger import Ledger
from ckptflow.ledger.store import _alembic_config, head_revision

NOW = datetime(2026, 5, 1, tzinfo=UTC).replace(tzinfo=None).isoformat(sep=" ")


def _ledger_at(url: str, revision: str) -> None:
    """Create the schema of `revision` only (what an older ckptflow left behind)."""
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg = _alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    engine.dispose()


def _sql(url: str, statements: list[tuple[str, dict]]) -> list[list[tuple]]:
    engine = create_engine(url)
    with engine.begin() as conn:
        out: list[list[tuple]] = []
        for sql, params in statements:
            res = conn.execute(text(sql), params)
            out.append([tuple(r) for r in res] if res.returns_rows else [])
    engine.dispose()
    return out


def _write_0001_rows(url: str, recorded_home: str | None, ckpt_path: str, export_path: str) -> None:
    """Rows as revision-0001 code wrote them: absolute paths, the home and ledger URL in runs.config."""
    settings = {"train": {"seed": 42}, **({"home": recorded_home, "ledger_url": None} if recorded_home else {})}
    config = {"settings": settings, "data_fingerprint": "d"}
    _sql(url, [
        ("INSERT INTO runs (id, name, status, fingerprint, config, base_model, total_steps, metrics, created_at, updated_at) "
         "VALUES (1, 'r', 'completed', 'fp', :config, 'm', 4, '{}', :now, :now)", {"config": json.dumps(config), "now": NOW}),
        ("INSERT INTO checkpoints (id, run_id, step, epoch, path, state, metrics, bytes, manifest_sha256, created_at) "
         "VALUES (1, 1, 4, 1.0, :path, 'committed', '{}', 10, 's', :now)", {"path": ckpt_path, "now": NOW}),
        ("INSERT INTO exports (id, run_id, checkpoint_id, path, merged, metrics, promoted, created_at) "
         "VALUES (1, 1, 1, :path, 1, '{}', 1, :now)", {"path": export_path, "now": NOW}),
        ("INSERT INTO leases (run_id, holder, host, pid, acquired_at, heartbeat_at) VALUES (1, '', 'h', 0, :now, :now)",
         {"now": NOW}),
    ])


# (case, where the db lives, the home recorded in runs.config, the home the rows' absolute paths point into,
#  the home the new code opens the ledger with)
CASES = [
    ("default layout: ledger.db in the home", "home", "home", "home", None),
    ("home moved before the upgrade", "home", "/srv/old-home", "/srv/old-home", None),
    ("ledger outside the home (CKPTFLOW_LEDGER_URL)", "db", "home", "home", "home"),
    ("no home recorded: the SQLite file's directory", "home", None, "home", None),
]


@pytest.mark.parametrize(("db_dir", "recorded", "written_in", "opened_with"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_upgrade_0001_to_head_makes_paths_relative_to_the_home(tmp_path, db_dir, recorded, written_in, opened_with):
    def at(where: str) -> Path:
        return Path(where) if where.startswith("/") else tmp_path / where

    url = f"sqlite:///{at(db_dir) / 'ledger.db'}"
    at(db_dir).mkdir(parents=True)
    _ledger_at(url, "0001")
    old_home = at(written_in)
    outside = tmp_path / "shipped" / "model"  # an export to --out elsewhere
    _write_0001_rows(url, str(at(recorded)) if recorded else None, f"{old_home}/runs/r/checkpoints/checkpoint-4", str(outside))
    _sql(url, [("UPDATE exports SET path = :p WHERE id = 1", {"p": f"{old_home}/exports/r"}),
               ("INSERT INTO exports (id, run_id, checkpoint_id, path, merged, metrics, promoted, created_at) "
                "VALUES (2, 1, 1, :p, 1, '{}', 0, :now)", {"p": str(outside), "now": NOW})])

    home = at(opened_with) if opened_with else at(db_dir)
    with Ledger(url, home=home if opened_with else None) as led:  # today's code: upgrades on open
        assert led.current_revision() == head_revision()
        run = led.get_run("r")
        assert led.checkpoints(run.id)[0].path == str(home / "runs" / "r" / "checkpoints" / "checkpoint-4")
        assert [e.path for e in led.exports(run.id)] == [str(home / "exports" / "r"), str(outside)]
        assert "home" not in run.config["settings"] and "ledger_url" not in run.config["settings"]
        assert run.config["settings"]["train"] == {"seed": 42}
        assert led.take_lease(run.id, "me").fence.token == 1  # the lease row of 0001 got a token
    [ckpts, exports] = _sql(url, [("SELECT path FROM checkpoints", {}), ("SELECT path FROM exports ORDER BY id", {})])
    assert ckpts == [("runs/r/checkpoints/checkpoint-4",)]
    assert exports == [("exports/r",), (str(outside),)]


def test_downgrade_to_0001_restores_absolute_paths(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'ledger.db'}"
    _ledger_at(url, "0001")
    _write_0001_rows(url, str(home), f"{home}/runs/r/checkpoints/checkpoint-4", f"{home}/exports/r")
    Ledger(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg = _alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "0001")
    engine.dispose()
    [ckpts, cols] = _sql(url, [("SELECT path FROM checkpoints", {}), ("PRAGMA table_info(leases)", {})])
    assert ckpts == [(f"{home}/runs/r/checkpoints/checkpoint-4",)]
    assert "token" not in [c[1] for c in cols]


def test_upgrade_keeps_only_the_newest_of_two_promoted_exports(tmp_path):
    """What an interrupted two-step promotion of 0001's code could leave: the newest had already won."""
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'ledger.db'}"
    _ledger_at(url, "0001")
    _write_0001_rows(url, str(home), f"{home}/runs/r/checkpoints/checkpoint-4", f"{home}/exports/r")
    _sql(url, [("INSERT INTO exports (id, run_id, checkpoint_id, path, merged, metrics, promoted, created_at) "
                "VALUES (2, 1, 1, :p, 1, '{}', 1, :now)", {"p": f"{home}/exports/r-2", "now": NOW})])
    with Ledger(url) as led:
        assert [(e.id, e.promoted) for e in led.exports()] == [(1, False), (2, True)]


def test_upgrade_scrubs_a_password_an_old_ledger_recorded(tmp_path):
    """A 0001 ledger that recorded a team ledger's URL (settings) and quoted it in error texts holds no password after the upgrade."""
    password = "pg-Secret-7781"
    team_url = f"postgresql+psycopg://ck:{password}@db.example:5432/ckptflow"
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    _ledger_at(url, "0001")
    config = {"settings": {"home": str(tmp_path), "ledger_url": team_url, "data": {"train": team_url}}, "data_fingerprint": "d"}
    _sql(url, [
        ("INSERT INTO runs (id, name, status, fingerprint, config, base_model, total_steps, metrics, created_at, updated_at) "
         "VALUES (1, 'r', 'failed', 'fp', :config, 'm', 4, '{}', :now, :now)", {"config": json.dumps(config), "now": NOW}),
        ("INSERT INTO checkpoints (id, run_id, step, epoch, path, state, metrics, bytes, manifest_sha256, created_at, reason) "
         "VALUES (1, 1, 2, 1.0, :path, 'corrupt', '{}', 10, 's', :now, :reason)",
         {"path": f"{tmp_path}/runs/r/checkpoints/checkpoint-2", "now": NOW, "reason": f"lost {team_url}"}),
        ("INSERT INTO attempts (id, run_id, chunk, attempt, start_step, end_step, status, error, started_at) "
         "VALUES (1, 1, 0, 1, 0, 2, 'failed', :error, :now)", {"error": f"OperationalError: could not connect to {team_url}", "now": NOW}),
    ])
    with Ledger(url, home=tmp_path) as ledger:
        run = ledger.get_run("r")
        assert "ledger_url" not in run.config["settings"]
        assert run.config["settings"]["data"]["train"] == "postgresql+psycopg://ck:***@db.example:5432/ckptflow"
        assert ledger.attempts(run.id)[0].error.endswith("ck:***@db.example:5432/ckptflow")
    dump = "\n".join(_sqlite_dump(tmp_path / "ledger.db"))
    assert password not in dump


def _sqlite_dump(path: Path) -> list[str]:
    import sqlite3

    con = sqlite3.connect(path)
    try:
        return list(con.iterdump())
    finally:
        con.close()


def _alembic_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    engine = create_engine(url)
    with engine.connect() as conn:
        revision = MigrationContext.configure(conn).get_current_revision()
    engine.dispose()
    return revision


def test_stored_revision_reads_what_alembic_reads_at_every_revision(tmp_path):
    from alembic.script import ScriptDirectory

    from ckptflow.ledger.store import stored_revision

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    create_engine(url).dispose()
    revisions = [None] + [r.revision for r in reversed(list(ScriptDirectory.from_config(_alembic_config()).walk_revisions()))]
    assert revisions[-1] == head_revision() and len(revisions) > 2
    for revision in revisions:
        if revision is not None:
            _ledger_at(url, revision)
        engine = create_engine(url)
        with engine.connect() as conn:
            assert stored_revision(conn) == _alembic_revision(url) == revision
        engine.dispose()


def test_opening_a_ledger_at_head_imports_no_alembic_and_a_fresh_one_is_migrated(tmp_path):
    """Alembic (~0.1 s of imports) is for migrating or refusing: every open after the first goes without it."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from ckptflow.ledger import Ledger\n"
        "Ledger(sys.argv[1]).close()\n"
        "print(sorted(m for m in sys.modules if m == 'alembic' or m.startswith('alembic.')) != [])\n"
    )
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    runs = [subprocess.run([sys.executable, "-c", code, url], capture_output=True, text=True, timeout=120, check=True)
            for _ in range(2)]  # fmt: skip
    assert [r.stdout.strip() for r in runs] == ["True", "False"]  # the first open creates the schema with Alembic
    assert _alembic_revision(url) == head_revision()
