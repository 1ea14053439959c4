"""Read-only commands are read-only: they create nothing, migrate nothing, and work on a read-only home.

The read-only home is a real read-only mount (a tmpfs remounted `ro`): as root, chmod does not
stop writes, a read-only filesystem does. `run` of a completed run answers without Prefect.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.badinput import assert_refused, assert_unchanged, ckptflow, snapshot, tree

pytestmark = pytest.mark.slow

# (args, exit code, what stderr/stdout must say) on a home that does not exist.
NOTHING_YET = [
    (("runs",), 0, "no runs yet"),
    (("runs", "--json"), 0, "[]"),
    (("checkpoints", "x"), 2, "no run named 'x'"),
    (("checkpoints", "x", "--all", "--json"), 2, "no run named 'x'"),
    (("verify", "x"), 2, "no run named 'x'"),
    (("verify", "x", "--json"), 2, "no run named 'x'"),
    (("prune", "x", "--dry-run"), 2, "no run named 'x'"),
    (("plan",), 0, "total steps"),
    (("plan", "--json"), 0, '"total_steps": 4'),
    (("plan", "--at", "3"), 0, "resume from"),
]
# Read-only commands on a home with the completed run `base`: exit 0 and what they must print.
ON_BASE = [
    (("runs",), "base"),
    (("runs", "--json"), '"name": "base"'),
    (("checkpoints", "base"), "committed"),
    (("checkpoints", "base", "--all", "--json"), '"step": 4'),
    (("verify", "base"), "2 committed checkpoints verified"),
    (("verify", "base", "--json"), '"ok": true'),
    (("plan",), "total steps"),
    (("plan", "--at", "3"), "checkpoint-2"),
    (("prune", "base", "--dry-run"), "keep"),
]
# Commands that must write: refused on a read-only home (exit 2), naming CKPTFLOW_HOME.
WRITERS = [("run", "-n", "base"), ("run", "-n", "other"), ("prune", "base"), ("export", "base")]


@pytest.mark.parametrize(("args", "code", "says"), NOTHING_YET, ids=[" ".join(a) for a, _, _ in NOTHING_YET])
def test_read_only_commands_create_nothing_when_nothing_exists(args, code, says, home, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = ckptflow(*args, cwd=cwd, env={"CKPTFLOW_HOME": str(home), "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert says in proc.stdout + proc.stderr
    assert not home.exists(), f"{args} created the home: {tree(home)}"
    assert tree(cwd) == {}, f"{args} wrote into the working directory: {tree(cwd)}"
    assert not (tmp_path / "hf").exists()


def test_default_home_in_an_empty_cwd_is_not_created(tmp_path):
    """Without CKPTFLOW_HOME the home is ./.ckptflow: `runs` and `plan` must not create it."""
    for args in (("runs",), ("plan",), ("verify", "x"), ("prune", "x", "--dry-run")):
        ckptflow(*args, cwd=tmp_path)
        assert tree(tmp_path) == {}, f"{args}: {tree(tmp_path)}"


@pytest.mark.parametrize(("args", "says"), ON_BASE, ids=[" ".join(a) for a, _ in ON_BASE])
def test_read_only_commands_change_nothing_on_a_completed_home(args, says, completed_home, tmp_path):
    before = snapshot(completed_home, tmp_path)
    proc = ckptflow(*args, cwd=tmp_path, env={"CKPTFLOW_HOME": str(completed_home)})
    assert proc.returncode == 0, proc.stderr
    assert says in proc.stdout + proc.stderr
    assert_unchanged(before, snapshot(completed_home, tmp_path))


# -- a read-only home ------------------------------------------------------------------------


@pytest.fixture
def readonly_home(completed_home, tmp_path):
    """A copy of the completed home on a tmpfs remounted read-only (skips if mounting is impossible)."""
    if os.geteuid() != 0:
        pytest.skip("a read-only mount needs root (euid 0); run as root or in a privileged container")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in this sandbox: {mounted.stderr.strip()}")
    try:
        home = mnt / "home"
        shutil.copytree(completed_home, home, symlinks=True)
        con = sqlite3.connect(home / "ledger.db")
        with con:  # the ledger's paths follow the copy, and the WAL is folded in (a cleanly closed ledger)
            for table in ("checkpoints", "exports"):
                con.execute(f"UPDATE {table} SET path = replace(path, ?, ?)", (str(completed_home.resolve()), str(home)))
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        remounted = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True, text=True)
        if remounted.returncode != 0:
            pytest.skip(f"cannot remount the tmpfs read-only: {remounted.stderr.strip()}")
        with pytest.raises(OSError):
            (home / "probe").write_text("x")
        yield home
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize(("args", "says"), ON_BASE, ids=[" ".join(a) for a, _ in ON_BASE])
def test_read_only_commands_work_on_a_read_only_home(args, says, readonly_home, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = snapshot(readonly_home, cwd)
    proc = ckptflow(*args, cwd=cwd, env={"CKPTFLOW_HOME": str(readonly_home)})
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert says in proc.stdout + proc.stderr
    assert_unchanged(before, snapshot(readonly_home, cwd))


@pytest.mark.parametrize("args", WRITERS, ids=[" ".join(a) for a in WRITERS])
def test_writers_refuse_a_read_only_home(args, readonly_home, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = snapshot(readonly_home, cwd)
    proc = ckptflow(*args, cwd=cwd, env={"CKPTFLOW_HOME": str(readonly_home)})
    assert_refused(proc, mentions=["CKPTFLOW_HOME", "read-only filesystem"])
    assert_unchanged(before, snapshot(readonly_home, cwd))


# -- run of a completed run ------------------------------------------------------------------


def _timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CKPTFLOW_")}
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env={**base, **env}, capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - start


def test_run_of_a_completed_run_answers_without_prefect(completed_home, tmp_path):
    prefect_home = tmp_path / "prefect-home"
    env = {"CKPTFLOW_HOME": str(completed_home), "PREFECT_HOME": str(prefect_home)}
    before = snapshot(completed_home, tmp_path)
    proc, seconds = _timed([sys.executable, "-X", "importtime", "-m", "ckptflow.cli", "run", "-n", "base"], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    assert "already completed" in proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert imported and not [m for m in imported if m.split(".")[0] == "prefect"], "run imported Prefect"
    assert not prefect_home.exists(), "Prefect was started (PREFECT_HOME created)"
    assert "Starting temporary server" not in proc.stderr
    assert_unchanged(before, snapshot(completed_home, tmp_path))
    _, help_seconds = _timed([sys.executable, "-m", "ckptflow.cli", "--help"], tmp_path, env)
    print(f"\nrun of a completed run: {seconds:.2f}s (with -X importtime); --help: {help_seconds:.2f}s; ratio {seconds / help_seconds:.1f}x")
