"""The background committer: real threads, a real SQLite ledger and real checkpoint directories."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from ckptflow.committer import BackgroundCommitter, CommitterLedger, commit_checkpoint
from ckptflow.errors import LeaseLostError
from ckptflow.integrity import MANIFEST_NAME, verify_checkpoint
from ckptflow.ledger import CheckpointState, Ledger, holding
from ckptflow.settings import CheckpointSettings

# How long a test lets a thread run before it concludes the thread is blocked (seconds).
SETTLE = 0.3


def _held() -> tuple[threading.Event, object]:
    """An event and a job that blocks until the event is set."""
    release = threading.Event()
    return release, lambda: release.wait(10)


def test_jobs_run_in_order_on_one_worker_thread():
    seen: list[tuple[int, str]] = []
    with BackgroundCommitter() as committer:
        for step in (2, 2, 4, 4, 6):
            committer.submit(step, lambda s=step: seen.append((s, threading.current_thread().name)))
    assert [s for s, _ in seen] == [2, 2, 4, 4, 6]
    assert {name for _, name in seen} == {"ckptflow-committer"}


@pytest.mark.parametrize("max_pending", [1, 2, 4])
def test_submit_blocks_while_max_pending_jobs_are_unfinished(max_pending):
    committer = BackgroundCommitter(max_pending=max_pending)
    release, job = _held()
    for step in range(max_pending):
        committer.submit(step, job)  # fills every slot without blocking
    extra = threading.Thread(target=committer.submit, args=(99, lambda: None))
    extra.start()
    extra.join(SETTLE)
    assert extra.is_alive() and committer.pending == max_pending  # the training thread would wait here
    release.set()
    extra.join(10)
    assert not extra.is_alive()
    committer.close()
    assert committer.pending == 0


def test_wait_for_returns_once_that_steps_jobs_are_done():
    committer = BackgroundCommitter()
    release, job = _held()
    committer.submit(2, job)
    committer.submit(4, lambda: None)
    committer.wait_for(6)  # nothing of checkpoint-6 is queued: no wait
    waiter = threading.Thread(target=committer.wait_for, args=(4,))
    waiter.start()
    waiter.join(SETTLE)
    assert waiter.is_alive()  # checkpoint-4's job waits behind checkpoint-2's
    release.set()
    waiter.join(10)
    assert not waiter.is_alive()
    committer.close()


def test_a_failed_job_is_raised_once_on_the_training_thread_and_later_jobs_are_skipped():
    ran: list[int] = []
    committer = BackgroundCommitter()
    committer.submit(2, lambda: ran.append(2))
    committer.submit(4, lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    committer.submit(6, lambda: ran.append(6))
    with pytest.raises(OSError, match="No space left"):  # the job's own exception, as a synchronous commit raised it
        committer.close()
    assert ran == [2]  # checkpoint-6 was never committed: its directory stays partial
    committer.raise_if_failed()  # raised once already
    committer.close()  # idempotent


def test_wait_for_raises_the_failed_jobs_error():
    committer = BackgroundCommitter()
    committer.submit(2, lambda: (_ for _ in ()).throw(LeaseLostError("lost the lease")))
    with pytest.raises(LeaseLostError):
        committer.wait_for(2)
    committer.raise_if_failed()  # once only
    committer.close()


def test_submit_raises_a_failure_not_raised_yet():
    committer = BackgroundCommitter()
    committer.submit(2, lambda: (_ for _ in ()).throw(LeaseLostError("lost the lease")))
    time.sleep(SETTLE)  # the job fails meanwhile; nobody looks
    with pytest.raises(LeaseLostError):
        committer.submit(4, lambda: None)
    committer.close()


def test_failing_training_still_commits_what_was_queued_and_keeps_its_own_error():
    ran: list[int] = []
    committer = BackgroundCommitter()
    with pytest.raises(KeyError, match="training failed"):
        with committer:
            committer.submit(2, lambda: (time.sleep(0.1), ran.append(2)))
            committer.submit(4, lambda: (_ for _ in ()).throw(OSError("commit failed too")))
            raise KeyError("training failed")
    assert ran == [2]  # the complete checkpoint queued before the failure was committed


def test_on_close_runs_on_the_worker_after_the_last_job():
    events: list[str] = []
    committer = BackgroundCommitter(on_close=lambda: events.append(f"close:{threading.current_thread().name}"))
    committer.submit(2, lambda: (time.sleep(0.05), events.append("job")))
    committer.close()
    assert events == ["job", "close:ckptflow-committer"]


def test_a_committer_never_used_starts_no_thread():
    before = {t.name for t in threading.enumerate()}
    with BackgroundCommitter(on_close=lambda: pytest.fail("nothing was opened")):
        pass
    assert "ckptflow-committer" not in {t.name for t in threading.enumerate()} - before


# -- commit_checkpoint against a real ledger --------------------------------------------------
class Run:
    def __init__(self, root: Path) -> None:
        self.ledger = Ledger(f"sqlite:///{root / 'ledger.db'}")
        self.run = self.ledger.create_run("r", fingerprint="fp", config={}, base_model="m", total_steps=10)
        self.ckdir = root / "runs" / "r" / "checkpoints"
        self.fence = self.ledger.take_lease(self.run.id, "trainer").fence

    def written(self, step: int) -> Path:
        """checkpoint-<step> as HF leaves it: files, a `writing` row, no manifest."""
        d = self.ckdir / f"checkpoint-{step}"
        (d / "sub").mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(os.urandom(4096))
        (d / "sub" / "trainer_state.json").write_text('{"global_step": %d}' % step)
        self.ledger.begin_checkpoint(self.run.id, step, str(d), fence=self.fence)
        return d

    def commit(self, step: int, ledger: Ledger | None = None):
        """As a training process commits: holding the run's lease (retention prunes under it); newer is better."""
        with holding(self.ledger.url, self.fence):
            return commit_checkpoint(
                ledger or self.ledger, self.run, CheckpointSettings(save_total_limit=2, retention="recent"),
                self.ckdir / f"checkpoint-{step}", step, epoch=0.5, metrics={"eval_loss": 1.0 / step}, fence=self.fence,
            )  # fmt: skip

    def state(self, step: int) -> CheckpointState | None:
        row = self.ledger.get_checkpoint(self.run.id, step)
        return row.state if row else None


def test_commit_checkpoint_writes_the_manifest_commits_the_row_and_prunes(tmp_path):
    r = Run(tmp_path)
    for step in (2, 4, 6):
        r.written(step)
        manifest = r.commit(step)
        assert manifest.step == step and {f.path for f in manifest.files} == {"adapter_model.safetensors", "sub/trainer_state.json"}
    row = r.ledger.get_checkpoint(r.run.id, 6)
    assert (row.state, row.bytes, row.epoch) == (CheckpointState.COMMITTED, manifest.total_bytes, 0.5)
    assert verify_checkpoint(Path(row.path), row.manifest_sha256) == []
    assert [r.state(s) for s in (2, 4, 6)] == [CheckpointState.PRUNED, CheckpointState.COMMITTED, CheckpointState.COMMITTED]
    assert not (r.ckdir / "checkpoint-2").exists()


def test_a_fenced_out_committer_writes_no_manifest_and_commits_nothing(tmp_path):
    r = Run(tmp_path)
    d = r.written(2)
    r.ledger.take_lease(r.run.id, "intruder", ttl_seconds=0)  # another process took the run over
    with pytest.raises(LeaseLostError):
        r.commit(2)
    assert not (d / MANIFEST_NAME).exists()  # the directory does not look complete
    assert r.state(2) == CheckpointState.WRITING


def test_commits_from_the_worker_use_its_own_ledger_while_the_training_thread_uses_the_other(tmp_path):
    r = Run(tmp_path)
    own = CommitterLedger(r.ledger)
    used: list[Ledger] = []
    committer = BackgroundCommitter(on_close=own.close)
    for step in (2, 4):
        r.written(step)
        committer.submit(step, lambda s=step: used.append(own.get()) or r.commit(s, own.get()))
        for _ in range(20):  # the training thread reads the ledger meanwhile
            r.ledger.checkpoints(r.run.id)
    committer.close()
    assert len({id(x) for x in used}) == 1 and used[0] is not r.ledger
    assert [r.state(s) for s in (2, 4)] == [CheckpointState.COMMITTED, CheckpointState.COMMITTED]


def test_an_in_memory_ledger_is_shared_with_the_committer():
    ledger = Ledger("sqlite://")
    own = CommitterLedger(ledger)
    assert own.get() is ledger
    own.close()
    assert ledger.list_runs() == []  # not closed: it is the training thread's


# -- the drills' pause points -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("pause_at", "pause_step", "point", "step", "expected"),
    [
        ("save-begun", 4, "save-begun", 4, True),
        ("save-begun", 4, "save-begun", 2, False),  # another step
        ("save-begun", None, "save-begun", 2, True),  # no step: the first time
        ("files-hashed", 4, "save-begun", 4, False),  # another point
        (None, None, "save-begun", 4, False),  # off
    ],
)
def test_armed_says_whether_pause_would_sleep(monkeypatch, pause_at, pause_step, point, step, expected):
    from ckptflow import faults
    from ckptflow.settings import FaultSettings

    monkeypatch.setattr(faults, "_done", False)
    faults.configure(FaultSettings(pause_at=pause_at, pause_step=pause_step, pause_seconds=0))
    try:
        assert faults.armed(point, step) is expected
        faults.pause(point, step)  # 0 s; a process pauses at most once
        assert faults.armed(point, step) is False
    finally:
        faults.configure(FaultSettings())
