"""Bad run names and bad `export --out` targets, through the real CLI on a completed home.

Each case exits 2 with no traceback, names what to change, and leaves the ledger (SQL dump)
and the file trees of the home and the working directory exactly as they were.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from tests.badinput import Case, assert_unchanged, ckptflow, run_case, snapshot

pytestmark = pytest.mark.slow

# What every run-name refusal says: the grammar (the option to change is case-specific).
GRAMMAR = "letters, digits, '.', '_' and '-'"
LONG = "a" * 101

NAME_CASES = [
    Case("run-dotdot", ("run", "--run-name", ".."), ("'..'", GRAMMAR, "--run-name")),
    Case("run-dot", ("run", "--run-name", "."), ("'.'", GRAMMAR, "--run-name")),
    Case("run-parent-escape", ("run", "--run-name", "../escape"), ("'../escape'", "contains '..'")),
    Case("run-absolute", ("run", "--run-name", "/srv/x"), ("'/srv/x'", GRAMMAR)),
    Case("run-nested", ("run", "--run-name", "a/b"), ("'a/b'", "contains '/'")),
    Case("run-newline", ("run", "--run-name", "a\nb"), ("'a\\nb'", "contains '\\n'")),
    Case("run-trailing-newline", ("run", "--run-name", "base\n"), ("'base\\n'",)),
    Case("run-101-chars", ("run", "--run-name", LONG), ("101 characters", "1-100 characters")),
    Case("run-300-chars", ("run", "--run-name", "b" * 300), ("300 characters",)),
    Case("run-leading-dash", ("run", "--run-name=-rf"), ("'-rf'", "starts with '-'")),
    Case("run-leading-dot", ("run", "--run-name", ".hidden"), ("'.hidden'", "starts with '.'")),
    Case("run-unicode", ("run", "--run-name", "ünïcode"), ("'ünïcode'", GRAMMAR)),
    Case("run-empty", ("run", "--run-name", ""), ("''", "empty")),
    Case("run-inner-dotdot", ("run", "--run-name", "a..b"), ("'a..b'",)),
    Case("run-space", ("run", "--run-name", "my run"), ("'my run'", "contains ' '")),
    Case("run-markup", ("run", "--run-name", "[/x]"), ("'[/x]'",)),
    Case("run-new-suffix-too-long", ("run", "--run-name", "a" * 99, "--new"), ("with the suffix '-2'", "shorter --run-name")),
    Case("run-tilde", ("run", "--run-name", "~"), ("'~'",)),
    Case("checkpoints-dotdot", ("checkpoints", ".."), ("'..'", GRAMMAR, "RUN argument")),
    Case("checkpoints-escape", ("checkpoints", "../base"), ("'../base'", "RUN argument")),
    Case("checkpoints-empty", ("checkpoints", ""), ("''", "RUN argument")),
    Case("verify-absolute", ("verify", "/srv/x"), ("'/srv/x'", "RUN argument")),
    Case("verify-nested", ("verify", "base/checkpoints"), ("'base/checkpoints'",)),
    Case("verify-newline", ("verify", "base\n"), ("'base\\n'",)),
    Case("prune-dotdot", ("prune", ".."), ("'..'", "RUN argument")),
    Case("prune-escape-dry-run", ("prune", "../base", "--dry-run"), ("'../base'",)),
    Case("export-dotdot", ("export", ".."), ("'..'", "RUN argument")),
    Case("export-escape", ("export", "../../x"), ("'../../x'",)),
    Case("export-leading-dash", ("export", "--", "-rf"), ("'-rf'", "starts with '-'")),
    Case("export-long", ("export", LONG), ("101 characters",)),
]

# `{home}` is replaced by the completed home's path; the cwd is the home's parent.
OUT_CASES = [
    Case("out-regular-file", ("export", "base", "--out", "out.txt"), ("--out", "is a file"), files={"out.txt": "mine"}),
    Case("out-file-force", ("export", "base", "--out", "out.txt", "--force"), ("is a file",), files={"out.txt": "m"}),
    Case(
        "out-foreign-dir",
        ("export", "base", "--out", "mine"),
        ("--out", "ckptflow did not write", "new or empty directory"),
        files={"mine/notes.txt": "keep me"},
    ),
    Case("out-foreign-dir-force", ("export", "base", "--out", "mine", "--force"), ("did not write",), files={"mine/a": "x"}),
    Case("out-checkpoints-dir", ("export", "base", "--out", "{home}/runs/base/checkpoints"), ("--out", "ckptflow manages")),
    Case("out-a-checkpoint", ("export", "base", "--out", "{home}/runs/base/checkpoints/checkpoint-4"), ("ckptflow manages",)),
    Case("out-new-dir-in-run", ("export", "base", "--out", "{home}/runs/base/my-export"), ("ckptflow manages",)),
    Case("out-runs-dir", ("export", "base", "--out", "{home}/runs"), ("ckptflow manages",)),
    Case("out-runs-dir-force", ("export", "base", "--out", "{home}/runs", "--force"), ("ckptflow manages",)),
    Case("out-home", ("export", "base", "--out", "{home}"), ("--out", "contains")),
    Case("out-contains-home", ("export", "base", "--out", "."), ("contains",)),
    Case("out-filesystem-root", ("export", "base", "--out", "/"), ("contains",)),
    Case("out-ledger-file", ("export", "base", "--out", "{home}/ledger.db"), ("contains",)),
    Case("out-builtin-model", ("export", "base", "--out", "{home}/builtin"), ("ckptflow manages",)),
    Case("out-data-cache", ("export", "base", "--out", "{home}/data-cache/x"), ("ckptflow manages",)),
    Case("out-exports-dir", ("export", "base", "--out", "{home}/exports"), ("every run's export",)),
    Case("out-earlier-export-no-force", ("export", "base", "--out", "{home}/exports/base"), ("--force", "earlier")),
    Case("out-relative-escape-into-runs", ("export", "base", "--out", "home/exports/../runs/base"), ("ckptflow manages",)),
]


def _with_home(case: Case, home: Path) -> Case:
    return replace(case, args=tuple(a.replace("{home}", str(home)) for a in case.args))


@pytest.mark.parametrize("case", NAME_CASES + OUT_CASES, ids=lambda c: c.id)
def test_bad_name_or_out_is_refused_and_changes_nothing(case, completed_home):
    run_case(_with_home(case, completed_home), home=completed_home, cwd=completed_home.parent)


def test_out_through_a_symlink_into_runs_is_refused(completed_home):
    cwd = completed_home.parent
    (cwd / "innocent").symlink_to(completed_home / "runs" / "base" / "checkpoints")
    run_case(Case("out-symlink", ("export", "base", "--out", "innocent"), ("ckptflow manages",)), home=completed_home, cwd=cwd)


def test_default_export_dir_that_ckptflow_did_not_write_is_refused(completed_home):
    """exports/<run> is ckptflow's, but a directory someone put there without a provenance file is not replaced."""
    target = completed_home / "exports" / "base"
    (target / "ckptflow-provenance.json").unlink()
    run_case(Case("default-foreign", ("export", "base"), ("did not write", "--out")), home=completed_home, cwd=completed_home.parent)
    assert (target / "model.safetensors").is_file()


def test_refusals_outside_the_cwd_leave_that_directory_alone(completed_home, tmp_path_factory):
    """An --out far from home and cwd: the foreign directory there is not touched either."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "data.bin").write_bytes(os.urandom(64))
    before = snapshot(completed_home, completed_home.parent, elsewhere)
    proc = ckptflow("export", "base", "--out", str(elsewhere), cwd=completed_home.parent, env={"CKPTFLOW_HOME": str(completed_home)})
    assert proc.returncode == 2 and "did not write" in proc.stderr and "Traceback" not in proc.stderr
    assert_unchanged(before, snapshot(completed_home, completed_home.parent, elsewhere))
