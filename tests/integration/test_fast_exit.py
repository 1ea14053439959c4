"""`ckptflow run` skips the interpreter's teardown after training, and loses nothing by it.

The real CLI's `main()` runs in a fresh interpreter with stdout piped. A marker object's
`__del__` shows whether the teardown ran; an atexit handler registered before anything else
(so it runs last) shows that every other atexit handler — Prefect's log flush and temporary
server stop among them — had its turn.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # trains tiny runs through Prefect

# Runs `ckptflow.cli.main` with argv; FAIL names an exception chunks raise instead of training.
_DRIVER = """
import atexit, json, os, sys
from pathlib import Path
marks = Path(os.environ["MARKS"])
atexit.register(lambda: (marks / "atexit-last").write_text("yes"))

class Finalized:  # module globals may be gone when __del__ runs: it keeps what it needs
    path = str(marks / "finalized")

    def __del__(self, open=open):
        with open(self.path, "w") as fh:
            fh.write("yes")

keep = Finalized()
if os.environ.get("FAIL"):
    import ckptflow.chunks, ckptflow.errors
    error = {"crash": RuntimeError, "bad-input": ckptflow.errors.BadInputError}[os.environ["FAIL"]]
    def run_chunk(job, launch=None):
        raise error("injected by the test")
    ckptflow.chunks.run_chunk = run_chunk
sys.argv = ["ckptflow", *json.loads(os.environ["ARGS"])]
from ckptflow.cli import main
main()
"""


def _run(args: list[str], tmp: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, Path]:
    marks = tmp / "marks"
    marks.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTFLOW_", "PREFECT_API_URL"))}
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER],
        cwd=tmp,
        env={**base, "CKPTFLOW_HOME": os.environ["CKPTFLOW_HOME"],
             "MARKS": str(marks), "ARGS": json.dumps(args), **env},
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return proc, marks


def _port_open(url: str) -> bool:
    host, port = url.split("//")[1].split("/")[0].split(":")
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((host, int(port))) == 0


def test_a_run_ends_without_teardown_and_keeps_everything(home, tmp_path):
    """Temporary server: exit 0, the whole JSON document, ledger and export complete, the server stopped."""
    from tests.prefect_db import seed_prefect_home

    env = {"PREFECT_HOME": str(seed_prefect_home(tmp_path / "ph")), "CKPTFLOW_TRAIN__MAX_STEPS": "2"}  # migrated: starts sooner
    proc, marks = _run(["run", "--run-name", "fast", "--json"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    document = json.loads(proc.stdout)  # complete: a truncated document would not parse
    assert document["run"] == "fast" and Path(document["export"]["path"], "config.json").is_file()
    assert (marks / "atexit-last").is_file() and not (marks / "finalized").exists()
    stopping = [line for line in proc.stderr.splitlines() if "Stopping temporary server on" in line]
    assert stopping and not _port_open(stopping[-1].split(" on ")[-1])  # Prefect's atexit stop ran and took effect
    assert not (home / "ledger.db-wal").exists()  # every ledger connection was closed (the last close checkpoints)
    con = sqlite3.connect(home / "ledger.db")
    try:
        status = con.execute("SELECT status FROM runs WHERE name = 'fast'").fetchone()[0]
        exports = con.execute("SELECT count(*) FROM exports").fetchone()[0]
    finally:
        con.close()
    assert status.lower() == "completed" and exports == 1


@pytest.mark.parametrize("fail, code", [("crash", 1), ("bad-input", 2)])
def test_a_failed_run_keeps_its_exit_code_and_message(home, tmp_path, fail, code):
    from tests.drills import session_server

    env = {**session_server().env, "FAIL": fail, "CKPTFLOW_TRAIN__RETRIES": "0", "CKPTFLOW_TRAIN__MAX_STEPS": "2"}
    proc, marks = _run(["run", "--run-name", "fails"], tmp_path, env)
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "injected by the test" in proc.stderr
    assert (marks / "atexit-last").is_file() and not (marks / "finalized").exists()


def test_an_answer_without_training_exits_normally(completed_home, tmp_path):
    """The check can fail: a completed run's answer trains nothing and takes the interpreter's normal exit."""
    proc, marks = _run(["run", "--run-name", "base", "--json"], tmp_path, {"PREFECT_HOME": str(tmp_path / "ph")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["already_completed"] is True
    assert (marks / "finalized").is_file()


def test_an_export_ends_without_teardown(completed_home, tmp_path):
    """`export` loads torch and the model too: exit 0, the whole JSON document, a model on disk, no teardown."""
    proc, marks = _run(["export", "base", "--out", str(tmp_path / "out"), "--json"], tmp_path, {"PREFECT_HOME": str(tmp_path / "ph")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(json.loads(proc.stdout)["path"], "config.json").is_file()
    assert (marks / "atexit-last").is_file() and not (marks / "finalized").exists()
    proc, marks = _run(["export", "base", "--step", "99"], tmp_path / "marks", {"PREFECT_HOME": str(tmp_path / "ph")})
    assert proc.returncode == 2 and "no committed checkpoint at step 99" in proc.stderr, proc.stderr[-3000:]
