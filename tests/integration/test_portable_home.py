"""A CKPTFLOW_HOME can be moved or copied: the ledger stores paths relative to it, so the
new location verifies and resumes, and nothing is read from or written to the old one."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from ckptflow.ledger import AttemptStatus, Ledger
from ckptflow.training import InjectedFault
from tests.badinput import ckptflow
from tests.helpers import adapter_weights, committed_steps, max_abs_diff, settings_for, train_without_prefect

pytestmark = pytest.mark.slow


def _relocate(how: str, src: Path, dest: Path) -> None:
    if how == "moved":
        os.rename(src, dest)  # `mv` on one filesystem
    else:
        shutil.copytree(src, dest, symlinks=True)


def _ledger_paths(home: Path) -> list[str]:
    con = sqlite3.connect(home / "ledger.db")
    try:
        return [p for (p,) in con.execute("SELECT path FROM checkpoints UNION ALL SELECT path FROM exports")]
    finally:
        con.close()


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_relocated_completed_home_verifies(completed_home_template, tmp_path, how):
    original = tmp_path / "original"
    shutil.copytree(completed_home_template, original, symlinks=True)
    relocated = tmp_path / "elsewhere" / "home"
    relocated.parent.mkdir()
    _relocate(how, original, relocated)

    assert _ledger_paths(relocated) and all(not p.startswith("/") for p in _ledger_paths(relocated))
    env = {"CKPTFLOW_HOME": str(relocated)}
    verified = ckptflow("verify", "base", "--json", cwd=tmp_path, env=env)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    listed = ckptflow("checkpoints", "base", "--json", cwd=tmp_path, env=env)
    paths = [row["path"] for row in json.loads(listed.stdout)]
    assert paths and all(Path(p).is_relative_to(relocated.resolve()) for p in paths), paths


@pytest.mark.parametrize("how", ["moved", "copied"])
def test_a_run_interrupted_then_relocated_resumes_bit_identical(completed_home_template, home, tmp_path, how):
    # 1. Chunks of 2 steps; the first attempt raises at step 3, after checkpoint-2 is committed.
    first = tmp_path / "first-home"
    interrupted = settings_for(first, train={"chunk_steps": 2}, fault={"at_step": 3, "mode": "raise"})
    with pytest.raises(InjectedFault):
        train_without_prefect(interrupted, "r")
    assert committed_steps(interrupted, "r") == [2]

    # 2. Relocate the home; the new one verifies (the CLI) before anything else touches it.
    second = tmp_path / "second" / "home"
    second.parent.mkdir()
    _relocate(how, first, second)
    verified = ckptflow("verify", "r", cwd=tmp_path, env={"CKPTFLOW_HOME": str(second)})
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # 3. Resume there: from checkpoint-2 of the new location, to the end.
    resumed = settings_for(second, train={"chunk_steps": 2})
    train_without_prefect(resumed, "r")
    with Ledger(resumed.ledger, home=resumed.home) as ledger:
        run = ledger.get_run("r")
        last = ledger.attempts(run.id)[-1]
        final = ledger.get_checkpoint(run.id, 4)
    assert (last.status, last.resumed_from_step) == (AttemptStatus.COMPLETED, 2)
    assert Path(final.path) == resumed.checkpoints_dir("r") / "checkpoint-4"

    # 4. Bit-identical to the uninterrupted run `base` (same settings, trained in one go).
    reference = completed_home_template / "runs" / "base" / "checkpoints" / "checkpoint-4"
    assert max_abs_diff(adapter_weights(reference), adapter_weights(Path(final.path))) == 0.0

    # 5. The old location was neither read nor written: gone if moved, untouched if copied.
    if how == "moved":
        assert not first.exists()
    else:
        assert committed_steps(interrupted, "r") == [2]
        assert not (interrupted.checkpoints_dir("r") / "checkpoint-4").exists()
