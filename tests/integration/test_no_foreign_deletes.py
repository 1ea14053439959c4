"""No sequence of CLI commands deletes a file that ckptflow did not write.

Foreign files are planted across the home and the working directory (next to exports,
inside runs/<run>/, in a would-be --out, and directories named like ckptflow's own temp
and `.pruning-` dirs but without its marker or ledger row); then bad and good commands
run: odd run names, export with --out variants, prune, verify, checkpoints, a real run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ckptflow.ledger import CheckpointState, Ledger
from ckptflow.recovery import prune_checkpoints
from tests.badinput import ckptflow

pytestmark = pytest.mark.slow

ODD_RUN = "odd.name-1_"
DEAD_PID = "999999999"  # a pid that cannot be alive: leftovers "owned" by it look abandoned

# Relative to the working directory (the home is `home/`).
FOREIGN = [
    "notes.txt",
    "data/keep.bin",
    "mine/notes.txt",  # a would-be --out: non-empty, not an export
    "out.txt",  # a would-be --out: a regular file
    "shipped/notes.txt",  # beside a real --out
    f"shipped/.model.tmp-deadbeef-{DEAD_PID}/keep.txt",  # named like an export temp dir, no marker
    f"shipped/.model.old-deadbeef-{DEAD_PID}/keep.txt",
    "home/notes.txt",
    "home/escape/keep.txt",  # where runs/../escape would land
    "home/runs/notes.txt",
    "home/runs/base/notes.txt",
    "home/runs/base/checkpoints/notes.txt",
    "home/runs/base/checkpoints/.pruning-checkpoint-99/keep.txt",  # no ledger row says pruned
    f"home/runs/{ODD_RUN}/notes.txt",  # the run directory exists before the run
    f"home/runs/{ODD_RUN}/checkpoints/notes.txt",
    "home/exports/notes.txt",
    f"home/exports/.base.tmp-deadbeef-{DEAD_PID}/keep.txt",
    f"home/exports/.base.old-deadbeef-{DEAD_PID}/keep.txt",
    "home/data-cache/notes.txt",
]


def _plant(cwd: Path) -> dict[str, bytes]:
    planted = {}
    for rel in FOREIGN:
        path = cwd / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        planted[rel] = os.urandom(32)
        path.write_bytes(planted[rel])
    return planted


@pytest.fixture
def prefect_api_url(prefect_harness):
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def test_no_command_sequence_deletes_a_foreign_file(completed_home, prefect_api_url):
    cwd = completed_home.parent
    planted = _plant(cwd)
    (cwd / "prune.toml").write_text("[checkpoint]\nsave_total_limit = 1\nretention = \"recent\"\n")
    env = {"CKPTFLOW_HOME": str(completed_home), "PREFECT_API_URL": prefect_api_url}
    commands = [
        # (arguments, expected exit code)
        (("run", "--run-name", ".."), 2),
        (("run", "--run-name", "."), 2),
        (("run", "--run-name", "../escape"), 2),
        (("run", "--run-name", str(cwd / "abs")), 2),
        (("export", "base", "--out", "mine", "--force"), 2),
        (("export", "base", "--out", "out.txt"), 2),
        (("export", "base", "--out", "home/runs"), 2),
        (("export", "base", "--out", "."), 2),
        (("export", "base", "--out", "home/runs/base/checkpoints"), 2),
        (("export", "base", "--out", "shipped/model"), 0),
        (("export", "base", "--out", "shipped/model", "--force", "--step", "2"), 0),  # replaces its own export
        (("export", "base"), 0),  # default target, beside the look-alike leftovers
        (("prune", "base", "--config", "prune.toml"), 0),  # really deletes checkpoint-2
        (("verify", "base"), 0),
        (("checkpoints", "base", "--all"), 0),
        (("run", "--run-name", ODD_RUN), 0),  # a real run into the pre-existing run dir
        (("prune", ODD_RUN), 0),
        (("verify", ODD_RUN), 0),
    ]
    for args, code in commands:
        proc = ckptflow(*args, cwd=cwd, env=env)
        assert proc.returncode == code, f"{args}: exit {proc.returncode}\n{proc.stderr}"
        assert "Traceback" not in proc.stdout + proc.stderr, args
    missing = [rel for rel, data in planted.items() if not (cwd / rel).is_file() or (cwd / rel).read_bytes() != data]
    assert missing == []
    assert not (completed_home / "runs" / "base" / "checkpoints" / "checkpoint-2").exists()  # ckptflow's own: pruned
    assert (cwd / "shipped" / "model" / "ckptflow-provenance.json").is_file()
    assert (completed_home / "exports" / ODD_RUN / "ckptflow-provenance.json").is_file()


def test_prune_keeps_a_checkpoint_holding_a_foreign_file_in_quarantine(completed_home):
    """A file its manifest does not list was put there by someone else: the directory is moved, not deleted."""
    ckdir = completed_home / "runs" / "base" / "checkpoints"
    (ckdir / "checkpoint-2" / "my-notes.txt").write_text("mine")
    with Ledger(f"sqlite:///{completed_home / 'ledger.db'}") as ledger:
        run = ledger.get_run("base")
        assert prune_checkpoints(ledger, run.id, {2: "retention"}) == [2]
        assert ledger.get_checkpoint(run.id, 2).state == CheckpointState.PRUNED
    assert not (ckdir / "checkpoint-2").exists()
    kept = list((completed_home / "runs" / "base" / "quarantine").glob("checkpoint-2-*/my-notes.txt"))
    assert [p.read_text() for p in kept] == ["mine"]


def test_prune_skips_a_directory_whose_manifest_is_not_the_recorded_one(completed_home):
    """The ledger's manifest hash is the proof of authorship: a swapped-in directory is not deleted."""
    ckdir = completed_home / "runs" / "base" / "checkpoints"
    manifest = ckdir / "checkpoint-2" / "ckptflow-manifest.json"
    manifest.write_text(manifest.read_text() + " ")
    with Ledger(f"sqlite:///{completed_home / 'ledger.db'}") as ledger:
        run = ledger.get_run("base")
        assert prune_checkpoints(ledger, run.id, {2: "retention"}) == []
        assert ledger.get_checkpoint(run.id, 2).state == CheckpointState.COMMITTED
    assert (ckdir / "checkpoint-2").is_dir()
