"""Recovery and pruning executors against a real SQLite ledger and real directories."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from ckptflow import recovery
from ckptflow.integrity import MANIFEST_NAME, QUARANTINE_REASON_NAME, sha256_file, write_manifest
from ckptflow.ledger import CheckpointState, Ledger
from ckptflow.recovery import PRUNING_PREFIX, prune_checkpoints, reconcile, resume_point, verify_run

COMMITTED, PRUNED, CORRUPT, PARTIAL, WRITING = (
    CheckpointState.COMMITTED, CheckpointState.PRUNED, CheckpointState.CORRUPT, CheckpointState.PARTIAL,
    CheckpointState.WRITING,
)


class Env:
    def __init__(self, root: Path) -> None:
        self.ledger = Ledger(f"sqlite:///{root / 'ledger.db'}")
        self.run = self.ledger.create_run("r", fingerprint="f", config={}, base_model="m", total_steps=10)
        self.ckdir = root / "runs" / "r" / "checkpoints"
        self.qdir = root / "runs" / "r" / "quarantine"

    def files(self, step: int) -> Path:
        d = self.ckdir / f"checkpoint-{step}"
        (d / "sub").mkdir(parents=True, exist_ok=True)
        (d / "model.safetensors").write_bytes(os.urandom(4096))
        (d / "sub" / "state.json").write_bytes(os.urandom(100))
        return d

    def manifest(self, step: int, loss: float | None = None) -> str:
        metrics = {} if loss is None else {"eval_loss": loss}
        return write_manifest(self.ckdir / f"checkpoint-{step}", step=step, metrics=metrics, settings_digest="d")[1]

    def commit(self, step: int, loss: float = 1.0) -> Path:
        """The happy path the trainer callback follows: begin, write files, manifest, commit."""
        d = self.ckdir / f"checkpoint-{step}"
        self.ledger.begin_checkpoint(self.run.id, step, str(d))
        self.files(step)
        sha = self.manifest(step, loss)
        self.ledger.commit_checkpoint(self.run.id, step, epoch=None, metrics={"eval_loss": loss}, bytes=4196, manifest_sha256=sha)
        return d

    def state(self, step: int) -> CheckpointState | None:
        ck = self.ledger.get_checkpoint(self.run.id, step)
        return ck.state if ck else None

    def reconcile(self) -> list[str]:
        return reconcile(self.ledger, self.run.id, self.ckdir, self.qdir)

    def quarantined(self) -> list[str]:
        return sorted(re.sub(r"-\d{8}T\d+Z(-\d+)?$", "", p.name) for p in self.qdir.iterdir()) if self.qdir.exists() else []


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    yield e
    e.ledger.close()


# -- reconcile ------------------------------------------------------------------------------
def test_writing_row_with_complete_dir_is_committed_from_its_manifest(env):
    d = env.ckdir / "checkpoint-4"
    env.ledger.begin_checkpoint(env.run.id, 4, str(d))
    env.files(4)
    sha = env.manifest(4, loss=0.7)  # killed after the manifest rename, before the ledger commit
    notes = env.reconcile()
    ck = env.ledger.get_checkpoint(env.run.id, 4)
    assert (ck.state, ck.manifest_sha256, ck.metrics, ck.bytes) == (COMMITTED, sha, {"eval_loss": 0.7}, 4196)
    assert d.is_dir() and "checkpoint-4" in notes[0]


def test_writing_row_without_manifest_is_partial_and_quarantined(env):
    env.commit(2)
    d = env.ckdir / "checkpoint-4"
    env.ledger.begin_checkpoint(env.run.id, 4, str(d))
    env.files(4)  # killed mid-save: no manifest
    notes = env.reconcile()
    assert env.state(4) is PARTIAL and "missing manifest" in env.ledger.get_checkpoint(env.run.id, 4).reason
    assert not d.exists() and env.quarantined() == ["checkpoint-4"]
    assert env.state(2) is COMMITTED and len(notes) == 1


def test_writing_row_without_directory_is_partial(env):
    env.ledger.begin_checkpoint(env.run.id, 4, str(env.ckdir / "checkpoint-4"))
    env.reconcile()
    assert env.state(4) is PARTIAL and env.quarantined() == []


def test_dir_without_manifest_is_quarantined_never_deleted(env):
    d = env.files(6)  # the ledger has no row (killed before begin was recorded, or a stray dir)
    content = (d / "model.safetensors").read_bytes()
    env.reconcile()
    assert env.state(6) is None and not d.exists()
    (dest,) = env.qdir.iterdir()
    assert (dest / "model.safetensors").read_bytes() == content and (dest / QUARANTINE_REASON_NAME).is_file()


def test_committed_row_whose_manifest_vanished_is_corrupt(env):
    d = env.commit(4)
    (d / MANIFEST_NAME).unlink()
    env.reconcile()
    assert env.state(4) is CORRUPT and env.quarantined() == ["checkpoint-4"]


def test_complete_dir_unknown_to_the_ledger_is_committed(env):
    env.files(8)
    sha = env.manifest(8, loss=0.5)
    notes = env.reconcile()
    ck = env.ledger.get_checkpoint(env.run.id, 8)
    assert (ck.state, ck.manifest_sha256, ck.path, ck.metrics) == (COMMITTED, sha, str(env.ckdir / "checkpoint-8"), {"eval_loss": 0.5})
    assert "unrecorded" in notes[0]


def test_unknown_dir_with_a_broken_manifest_is_quarantined(env):
    d = env.files(8)
    env.manifest(8)
    (d / "model.safetensors").write_bytes(b"x")
    env.reconcile()
    assert env.state(8) is None and env.quarantined() == ["checkpoint-8"]


def test_committed_row_whose_dir_is_missing_is_corrupt(env):
    import shutil

    shutil.rmtree(env.commit(4))
    notes = env.reconcile()
    ck = env.ledger.get_checkpoint(env.run.id, 4)
    assert (ck.state, ck.reason) == (CORRUPT, "directory missing") and "checkpoint-4" in notes[0]


def test_reconcile_is_idempotent_and_quiet_when_consistent(env):
    env.commit(2)
    env.files(4)
    assert env.reconcile() != []
    assert env.reconcile() == []
    assert env.state(2) is COMMITTED


# -- resume_point ---------------------------------------------------------------------------
def test_resume_from_newest_verified(env):
    for step in (2, 4, 6):
        env.commit(step)
    rp = resume_point(env.ledger, env.run.id, env.ckdir, env.qdir)
    assert (rp.step, rp.path, rp.notes) == (6, env.ckdir / "checkpoint-6", [])
    assert rp.checkpoint_id == env.ledger.get_checkpoint(env.run.id, 6).id
    assert resume_point(env.ledger, env.run.id, env.ckdir, env.qdir, max_step=5).step == 4


def test_resume_falls_back_past_a_corrupt_newest(env):
    for step in (2, 4, 6):
        env.commit(step)
    p = env.ckdir / "checkpoint-6" / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[0] ^= 1
    p.write_bytes(bytes(data))
    rp = resume_point(env.ledger, env.run.id, env.ckdir, env.qdir)
    assert rp.step == 4 and len(rp.notes) == 1 and "checkpoint-6" in rp.notes[0]
    ck6 = env.ledger.get_checkpoint(env.run.id, 6)
    assert ck6.state is CORRUPT and "model.safetensors" in ck6.reason
    assert env.quarantined() == ["checkpoint-6"]


def test_resume_rejects_a_manifest_the_ledger_did_not_record(env):
    env.commit(2)
    env.commit(4)
    env.manifest(4, loss=0.0)  # a valid but different manifest
    rp = resume_point(env.ledger, env.run.id, env.ckdir, env.qdir)
    assert rp.step == 2 and env.state(4) is CORRUPT


def test_resume_none_when_nothing_verifies(env):
    assert resume_point(env.ledger, env.run.id, env.ckdir, env.qdir) is None
    d = env.commit(2)
    (d / "sub" / "state.json").unlink()
    assert resume_point(env.ledger, env.run.id, env.ckdir, env.qdir) is None
    assert env.state(2) is CORRUPT


def test_verify_run_reports_without_changing_anything(env):
    env.commit(2)
    d = env.commit(4)
    (d / "model.safetensors").write_bytes(b"short")
    bad = verify_run(env.ledger, env.run.id)
    assert list(bad) == [4] and "model.safetensors" in bad[4][0]
    assert env.state(4) is COMMITTED and d.is_dir()


# -- prune_checkpoints ----------------------------------------------------------------------
def test_prune_deletes_marks_and_respects_protection(env):
    dirs = {step: env.commit(step) for step in (2, 4, 6, 8)}
    env.ledger.begin_checkpoint(env.run.id, 10, str(env.ckdir / "checkpoint-10"))
    pruned = prune_checkpoints(
        env.ledger, env.run.id, {2: "not among the 2 best", 4: "not among the 2 best", 8: "x", 10: "x"}, never_delete={8}
    )
    assert pruned == [2, 4]
    for step in (2, 4):
        ck = env.ledger.get_checkpoint(env.run.id, step)
        assert (ck.state, ck.reason) == (PRUNED, "not among the 2 best") and ck.pruned_at is not None
        assert not dirs[step].exists()
    assert env.state(6) is COMMITTED and env.state(8) is COMMITTED and env.state(10) is WRITING
    assert sorted(p.name for p in env.ckdir.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    assert prune_checkpoints(env.ledger, env.run.id, {2: "again", 4: "again"}) == []  # idempotent


def test_prune_killed_before_delete_leaves_no_committed_row_without_its_dir(env, monkeypatch):
    d = env.commit(2)
    env.commit(4)

    def killed(path, *a, **k):
        raise KeyboardInterrupt("SIGKILL stand-in")

    monkeypatch.setattr(recovery.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(env.ledger, env.run.id, {2: "retention"})
    monkeypatch.undo()
    assert env.state(2) is PRUNED and not d.exists() and (env.ckdir / f"{PRUNING_PREFIX}checkpoint-2").is_dir()
    for ck in env.ledger.checkpoints(env.run.id, [COMMITTED]):
        assert Path(ck.path).is_dir()
    assert resume_point(env.ledger, env.run.id, env.ckdir, env.qdir).step == 4
    notes = env.reconcile()
    assert "interrupted prune" in notes[0]
    assert sorted(p.name for p in env.ckdir.iterdir()) == ["checkpoint-4"] and env.quarantined() == []


def test_prune_killed_after_marking_is_finished_by_reconcile(env, monkeypatch):
    d = env.commit(2)
    monkeypatch.setattr(recovery, "_delete_checkpoint_dir", lambda path: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        prune_checkpoints(env.ledger, env.run.id, {2: "retention"})
    monkeypatch.undo()
    assert env.state(2) is PRUNED and d.is_dir()  # row says pruned, files still there: safe
    env.reconcile()
    assert not d.exists() and not (env.ckdir / f"{PRUNING_PREFIX}checkpoint-2").exists()
    assert env.state(2) is PRUNED and env.reconcile() == []


def test_pruning_dir_unknown_to_the_ledger_is_quarantined(env):
    stray = env.ckdir / f"{PRUNING_PREFIX}checkpoint-12"
    stray.mkdir(parents=True)
    (stray / "f").write_bytes(b"data")
    env.reconcile()
    assert not stray.exists() and len(list(env.qdir.iterdir())) == 1


def test_manifest_sha_recorded_matches_file(env):
    d = env.commit(2)
    assert env.ledger.get_checkpoint(env.run.id, 2).manifest_sha256 == sha256_file(d / MANIFEST_NAME)


def test_leftover_dir_of_a_corrupt_row_is_quarantined(env):
    d = env.commit(4)
    env.ledger.mark_checkpoint(env.run.id, 4, CORRUPT, "sha differs")  # killed before the quarantine move
    env.reconcile()
    assert not d.exists() and env.quarantined() == ["checkpoint-4"] and env.state(4) is CORRUPT
