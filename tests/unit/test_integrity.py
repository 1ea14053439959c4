"""Manifests, verification and quarantine on real directories of random bytes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from ckptflow.integrity import (
    MANIFEST_NAME,
    QUARANTINE_REASON_NAME,
    checkpoint_step,
    dir_bytes,
    quarantine,
    read_manifest,
    sha256_file,
    unmanifested_dirs,
    verify_checkpoint,
    write_manifest,
)

# The files of a fake checkpoint: relative path → size in bytes.
FAKE_FILES = {"adapter_model.safetensors": 70_000, "optimizer.pt": 5_000, "trainer_state.json": 300, "sub/rng_state.pth": 17}


def make_checkpoint(root, step, files=FAKE_FILES):
    d = root / f"checkpoint-{step}"
    for rel, size in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
    return d


@pytest.fixture
def ckpt(tmp_path):
    d = make_checkpoint(tmp_path / "checkpoints", 6)
    manifest, sha = write_manifest(d, step=6, metrics={"eval_loss": 1.5, "epoch": 1.0}, settings_digest="abc")
    return d, manifest, sha


def test_write_then_verify_round_trip(ckpt):
    d, manifest, sha = ckpt
    assert verify_checkpoint(d) == [] and verify_checkpoint(d, sha) == []
    assert read_manifest(d) == manifest
    assert sha == sha256_file(d / MANIFEST_NAME)
    assert [f.path for f in manifest.files] == sorted(FAKE_FILES)
    assert manifest.total_bytes == sum(FAKE_FILES.values()) == dir_bytes(d) - (d / MANIFEST_NAME).stat().st_size
    for f in manifest.files:
        assert f.sha256 == hashlib.sha256((d / f.path).read_bytes()).hexdigest()
    assert (manifest.step, manifest.metrics, manifest.settings_digest) == (6, {"eval_loss": 1.5, "epoch": 1.0}, "abc")
    assert sorted(p.name for p in d.iterdir()) == sorted([MANIFEST_NAME, "adapter_model.safetensors", "optimizer.pt", "trainer_state.json", "sub"])


def test_rewriting_a_manifest_excludes_the_old_one(ckpt):
    d, manifest, _ = ckpt
    again, _ = write_manifest(d, step=6, metrics={}, settings_digest="abc")
    assert again.files == manifest.files


@pytest.mark.parametrize("size", [0, 1, 1000, 3 * 4096 + 5])
def test_sha256_file_matches_hashlib_across_block_boundaries(tmp_path, size):
    p = tmp_path / "f"
    data = os.urandom(size)
    p.write_bytes(data)
    assert sha256_file(p, block_size=4096) == hashlib.sha256(data).hexdigest() == sha256_file(p)


def _truncate(d):
    p = d / "adapter_model.safetensors"
    p.write_bytes(p.read_bytes()[:-10])
    return "adapter_model.safetensors", "size"


def _flip_byte(d):
    p = d / "optimizer.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    return "optimizer.pt", "sha256 differs"


def _delete(d):
    (d / "sub" / "rng_state.pth").unlink()
    return "sub/rng_state.pth", "missing"


def _remove_manifest(d):
    (d / MANIFEST_NAME).unlink()
    return MANIFEST_NAME, "missing manifest"


def _garble_manifest(d):
    (d / MANIFEST_NAME).write_text("{not json")
    return MANIFEST_NAME, "unreadable"


def _manifest_rewritten(d):
    write_manifest(d, step=6, metrics={"eval_loss": 0.1}, settings_digest="abc")  # valid, but not what the ledger saw
    return MANIFEST_NAME, "differs from the ledger"


@pytest.mark.parametrize(
    "damage", [_truncate, _flip_byte, _delete, _remove_manifest, _garble_manifest, _manifest_rewritten]
)
def test_each_kind_of_damage_is_detected_naming_the_file(ckpt, damage):
    d, _, sha = ckpt
    name, what = damage(d)
    problems = verify_checkpoint(d, sha)
    assert len(problems) == 1, problems
    assert f"checkpoint-6/{name}" in problems[0] and what in problems[0]


def test_ledger_hash_mismatch_only_when_expected_given(ckpt):
    d, _, _ = ckpt
    assert verify_checkpoint(d) == []
    assert "differs from the ledger" in verify_checkpoint(d, "0" * 64)[0]


def test_extra_files_are_not_a_problem(ckpt):
    d, _, sha = ckpt
    (d / "extra.txt").write_text("hi")
    assert verify_checkpoint(d, sha) == []


def test_step_mismatch_and_missing_dir(ckpt, tmp_path):
    d, _, _ = ckpt
    moved = d.rename(d.with_name("checkpoint-8"))
    assert "manifest is for step 6" in verify_checkpoint(moved)[0]
    assert "missing" in verify_checkpoint(tmp_path / "checkpoint-99")[0]


def test_unsafe_manifest_paths_are_rejected(ckpt):
    d, _, _ = ckpt
    data = json.loads((d / MANIFEST_NAME).read_text())
    data["files"][0]["path"] = "../../etc/passwd"
    (d / MANIFEST_NAME).write_text(json.dumps(data))
    assert any("unsafe path" in p for p in verify_checkpoint(d))


def test_quarantine_moves_and_never_deletes(ckpt, tmp_path):
    d, manifest, _ = ckpt
    before = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    qroot = tmp_path / "quarantine"
    dest = quarantine(d, qroot, "sha differs for optimizer.pt")
    assert not d.exists() and dest.parent == qroot and dest.name.startswith("checkpoint-6-")
    after = {p.relative_to(dest): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    reason = after.pop(Path(QUARANTINE_REASON_NAME))
    assert after == before and b"sha differs for optimizer.pt" in reason
    # a second checkpoint of the same name quarantined right after does not collide
    d2 = make_checkpoint(d.parent, 6)
    dest2 = quarantine(d2, qroot, "again")
    assert dest2 != dest and dest.is_dir() and dest2.is_dir()
    with pytest.raises(FileNotFoundError):
        quarantine(d, qroot, "gone")


def test_unmanifested_dirs_sorted_numerically(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (100, 2, 10, 4):
        make_checkpoint(root, step, {"f.bin": 3})
    write_manifest(root / "checkpoint-4", step=4, metrics={}, settings_digest="")
    (root / "runs").mkdir()
    (root / "checkpoint-x").mkdir()
    (root / "checkpoint-7.tmp").mkdir()
    assert [p.name for p in unmanifested_dirs(root)] == ["checkpoint-2", "checkpoint-10", "checkpoint-100"]
    assert unmanifested_dirs(tmp_path / "absent") == []


@pytest.mark.parametrize(
    "name, step",
    [("checkpoint-12", 12), ("checkpoint-0", 0), ("checkpoint-", None), ("checkpoint-1a", None),
     ("ckpt-3", None), (".pruning-checkpoint-3", None), ("checkpoint-3-20260101T000000Z", None)],
)
def test_checkpoint_step(tmp_path, name, step):
    assert checkpoint_step(tmp_path / name) == step


def test_dir_bytes(tmp_path):
    d = make_checkpoint(tmp_path, 1, {"a": 10, "b/c": 20})
    assert dir_bytes(d) == 30 and dir_bytes(d / "a") == 10
