"""Bad input exits 2 with a message naming the problem, and records nothing in the ledger."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _ckptflow(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptflow.cli", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _ledger_rows(home: Path) -> int:
    db = home / "ledger.db"
    if not db.exists():
        return 0
    import sqlite3

    con = sqlite3.connect(db)
    try:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type='table'")}
        return sum(con.execute(f"select count(*) from {t}").fetchone()[0] for t in ("runs", "checkpoints", "attempts", "exports") if t in tables)
    finally:
        con.close()


@pytest.mark.parametrize(
    ("env", "files", "expected"),
    [
        ({"CKPTFLOW_DATA__TRAIN": "missing.jsonl"}, {}, "missing.jsonl"),
        ({"CKPTFLOW_DATA__TRAIN": "bad.jsonl"}, {"bad.jsonl": '{"text": "ok"}\n{"text": broken\n'}, "line 2"),
        ({"CKPTFLOW_CHECKPOINT__SAVE_STEPS": "0"}, {}, "CKPTFLOW_CHECKPOINT__SAVE_STEPS"),
        ({"CKPTFLOW_CHECKPOINT__EVAL_STRATEGY": "no"}, {}, "retention=best"),
        ({"CKPTFLOW_MODEL__NAME_OR_PATH": "no-such-org/no-such-model"}, {}, "no-such-org/no-such-model"),
        ({"CKPTFLOW_MODEL__NAME_OR_PATH": "./no/such/dir"}, {}, "no/such/dir"),
    ],
    ids=["missing-file", "malformed-jsonl", "save-steps-0", "best-without-eval", "unknown-hub-id", "missing-dir"],
)
def test_run_with_bad_input_exits_2_and_records_nothing(home, tmp_path, env, files, expected):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    proc = _ckptflow("run", "--run-name", "bad", cwd=tmp_path, env={"CKPTFLOW_HOME": str(home), **env})
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr
    assert _ledger_rows(home) == 0


def test_unknown_config_key_exits_2(home, tmp_path):
    (tmp_path / "c.toml").write_text("[train]\nmax_stepz = 3\n")
    proc = _ckptflow("plan", "--config", "c.toml", cwd=tmp_path, env={"CKPTFLOW_HOME": str(home)})
    assert proc.returncode == 2
    assert "max_stepz" in proc.stderr
