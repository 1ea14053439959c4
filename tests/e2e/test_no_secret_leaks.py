"""No secret leaves: a team ledger's password and the cloud SDK keys never land anywhere ckptflow writes.

A real PostgreSQL server with password authentication holds the ledger; a real Prefect
server records the flow runs. With a unique password in CKPTFLOW_LEDGER_URL and unique AWS
keys in the environment, the test trains a run with a retried chunk, exports it, lists and
verifies it, runs `retrain`, and makes a bad-password call; then it searches, byte for
byte, every file of the home and the shipped export, the whole ledger, Prefect's own
database (parameters, artifacts, logs, state messages) and everything printed.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.e2e.conftest import BIN, _clean_env, _free_port, _wait_healthy, seed_prefect_home, start_process, stop_process

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUN = "leak"


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptflow.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
    )


def _files(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def _ledger_text(server, database: str) -> str:
    """Every row of every ledger table as JSON text (what a teammate with read access sees)."""
    with server.connect(database) as con:
        tables = [r[0] for r in con.execute("select tablename from pg_tables where schemaname = 'public'").fetchall()]
        return "\n".join(
            str(row[0]) for t in tables for row in con.execute(f'select row_to_json(t)::text from "{t}" t').fetchall()
        )


def _needles(values: list[str]) -> list[bytes]:
    """Each secret as it could appear: raw, URL-encoded, JSON-escaped."""
    out = set()
    for v in values:
        for form in (v, quote(v, safe=""), v.replace("/", "\\/")):
            out.add(form.encode())
    return sorted(out)


def test_no_secret_in_home_export_ledger_prefect_db_or_output(postgres_server, tmp_path):
    from sqlalchemy.engine import make_url

    ledger_url = postgres_server.create_database()  # a fresh database: its URL carries the role's password
    database = make_url(ledger_url).database
    aws_key_id = "AKIA" + secrets.token_hex(8).upper()
    aws_secret = "leak-" + secrets.token_urlsafe(30)
    wrong_password = "wrong-" + secrets.token_hex(12)
    secret_values = [postgres_server.password, aws_key_id, aws_secret, wrong_password]

    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    prefect_home = tmp_path / "prefect-home"
    env = {
        **_clean_env(prefect_home, api_url),
        "CKPTFLOW_HOME": str(tmp_path / "home"),
        "CKPTFLOW_LEDGER_URL": ledger_url,
        "AWS_ACCESS_KEY_ID": aws_key_id,
        "AWS_SECRET_ACCESS_KEY": aws_secret,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    drill = {"CKPTFLOW_TRAIN__CHUNK_STEPS": "2", "CKPTFLOW_TRAIN__RETRY_DELAY_SECONDS": "0", "CKPTFLOW_FAULT__AT_STEP": "3"}
    seed_prefect_home(prefect_home)  # a migrated database with no secrets in it: the search covers what the run adds
    server_log = tmp_path / "server.log"
    server = start_process([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, server_log)
    printed: list[str] = []
    try:
        _wait_healthy(api_url, server, server_log)
        shipped = tmp_path / "shipped"
        steps = [
            (("run", "--run-name", RUN), {**env, **drill}, 0),
            (("export", RUN, "--out", str(shipped)), env, 0),
            (("runs", "--json"), env, 0),
            (("checkpoints", RUN, "--all", "--json"), env, 0),
            (("verify", RUN, "--json"), env, 0),
            (("plan", "--json"), env, 0),
            (("prune", RUN, "--dry-run", "--json"), env, 0),
            (("retrain", "--force"), env, 0),
            (("runs",), {**env, "CKPTFLOW_LEDGER_URL": ledger_url.replace(postgres_server.password, wrong_password)}, 2),
        ]
        for args, step_env, code in steps:
            proc = _cli(*args, env=step_env, cwd=tmp_path)
            printed += [proc.stdout, proc.stderr]
            assert proc.returncode == code, f"ckptflow {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    finally:
        stop_process(server)

    places: dict[str, bytes] = {str(p): p.read_bytes() for p in _files(tmp_path / "home", tmp_path / "shipped", prefect_home)}
    places["ledger"] = _ledger_text(postgres_server, database).encode()
    places["printed"] = "\n".join(printed).encode()
    assert any(p.endswith(".db") for p in places), "Prefect's database was not found under PREFECT_HOME"
    leaks = [(where, needle.decode()[:6] + "…") for where, data in places.items() for needle in _needles(secret_values) if needle in data]
    assert not leaks, f"secrets found in: {leaks}"
