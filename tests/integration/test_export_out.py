"""`export --out`: a new or empty directory works, `--force` replaces an earlier export, modes follow the umask."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from tests.badinput import assert_refused, ckptflow

pytestmark = pytest.mark.slow

PROVENANCE = "ckptflow-provenance.json"


def _export(home: Path, *args: str, umask: int = 0o022):
    """`ckptflow export base ARGS` with the given umask (the child inherits it)."""
    old = os.umask(umask)
    try:
        return ckptflow("export", "base", *args, cwd=home.parent, env={"CKPTFLOW_HOME": str(home)})
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) for p in [root, *root.rglob("*")]}


def _assert_export(path: Path, umask: int) -> None:
    assert (path / PROVENANCE).is_file() and (path / "model.safetensors").is_file()
    expected = {rel: (0o777 if (path / rel).is_dir() else 0o666) & ~umask for rel in _modes(path)}
    assert _modes(path) == expected  # safetensors' private temp file used to leave model.safetensors 0600
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]  # no temp dirs left


def test_out_new_dir_then_force_replaces_only_that_export(completed_home):
    cwd = completed_home.parent
    out = cwd / "shipped" / "model"
    (cwd / "shipped").mkdir()
    (cwd / "shipped" / "notes.txt").write_text("a sibling ckptflow must not touch")
    proc = _export(completed_home, "--out", "shipped/model", umask=0o027)
    assert proc.returncode == 0, proc.stderr
    _assert_export(out, 0o027)
    first = json.loads((out / PROVENANCE).read_text())["exported_at"]
    assert_refused(_export(completed_home, "--out", "shipped/model"), mentions=["--force"])
    assert json.loads((out / PROVENANCE).read_text())["exported_at"] == first
    proc = _export(completed_home, "--out", "shipped/model", "--force", "--step", "2")
    assert proc.returncode == 0, proc.stderr
    _assert_export(out, 0o022)
    provenance = json.loads((out / PROVENANCE).read_text())
    assert provenance["step"] == 2 and provenance["exported_at"] != first
    assert (cwd / "shipped" / "notes.txt").read_text() == "a sibling ckptflow must not touch"
    assert sorted(p.name for p in (cwd / "shipped").iterdir()) == ["model", "notes.txt"]


def test_out_empty_dir_is_filled(completed_home):
    out = completed_home.parent / "empty"
    out.mkdir()
    proc = _export(completed_home, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    _assert_export(out, 0o022)


def test_default_target_is_replaced_without_force_and_other_exports_stay(completed_home):
    exports = completed_home / "exports"
    before = {p.name for p in exports.iterdir()}
    proc = _export(completed_home)
    assert proc.returncode == 0, proc.stderr
    _assert_export(exports / "base", 0o022)
    assert {p.name for p in exports.iterdir()} == before
