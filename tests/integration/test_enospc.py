"""A real full disk: CKPTFLOW_HOME/runs on a small tmpfs that the test fills while a save begins.

`ckptflow run` (the real flow) saves; the save fails with ENOSPC for real (no mocks): nothing partial is committed, the partial
checkpoint is quarantined, the attempt fails saying how much space is needed; after the
filler file is deleted the same run resumes from the last committed checkpoint and ends
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess

import pytest
from ckptflow.ledger import AttemptStatus, CheckpointState, Ledger, RunStatus

from tests.drills import Driver, Watcher, committed_checkpoints_verify, final_diff, full_verify, pause_env, run_driver

pytestmark = pytest.mark.slow

# Size of the filesystem holding the checkpoints: room for a few ~140 KB checkpoints.
TMPFS_SIZE = "4m"
# Free space left when the disk is filled: less than one checkpoint, so the save fails midway.
LEAVE_FREE = 48 * 1024
# The drill settings plus no free-space margin: the guard lets the save start, the disk stops it.
ENV = {"CKPTFLOW_CHECKPOINT__MIN_FREE_BYTES": "0"}


@pytest.fixture
def small_disk(home):
    """home/runs as a TMPFS_SIZE tmpfs (needs root and mount permission, else skip)."""
    runs = home / "runs"
    runs.mkdir(parents=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (euid 0); run as root or in a privileged container")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(runs)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in this sandbox: {mounted.stderr.strip()}")
    try:
        yield runs
    finally:
        subprocess.run(["umount", "-l", str(runs)], check=False)


def _fill(directory, leave: int) -> int:
    """Write a filler file until ENOSPC, then give back `leave` bytes; returns the filler's size."""
    path = directory / "filler.bin"
    block = b"\0" * 65536
    with open(path, "wb") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.truncate(path, max(0, path.stat().st_size - leave))
    return path.stat().st_size


def test_disk_full_during_a_save_then_rerun_after_freeing_space(home, small_disk):
    watcher = Watcher(home, "full")
    try:
        # 1. Train; when the ledger says checkpoint-4 is being written, fill the disk.
        driver = Driver(home, "full", {**ENV, **pause_env("save-begun", 4, seconds=5)})
        watcher.wait_for(lambda s: s.committed() == [2] and s.state(4) == CheckpointState.WRITING, driver, "save of 4")
        _fill(small_disk, LEAVE_FREE)
        code = driver.wait()
        out = driver.output()
        assert code == 1, out
        st = watcher.state()
    finally:
        watcher.close()

    # 2. Nothing partial committed; the half-written checkpoint-4 is in quarantine; the message says how much to free.
    assert st.committed() == [2] and committed_checkpoints_verify(home, "full") == {}
    assert st.state(4) == CheckpointState.PARTIAL and "disk full" in st.rows[4].reason
    assert not st.ckpt(4).exists()
    assert [p.name.split("-")[:2] for p in (small_disk / "full" / "quarantine").iterdir()] == [["checkpoint", "4"]]
    failed = st.attempts[-1]
    assert failed.status == AttemptStatus.FAILED
    assert re.search(r"disk full while saving checkpoint-4 .* free at least [\d.]+ (B|kB|MB|GB|TB) more", failed.error), failed.error
    assert "resumes from checkpoint-2" in failed.error
    assert "free at least" in out  # `ckptflow run` (its log of the failed chunk) says how much to free

    # 3. Free the space; the same run resumes from checkpoint-2 and ends bit-identical.
    (small_disk / "filler.bin").unlink()
    code, out = run_driver(home, "full", ENV)
    assert code == 0, out
    with Ledger(f"sqlite:///{home / 'ledger.db'}") as ledger:
        run = ledger.get_run("full")
        resumed = [a.resumed_from_step for a in ledger.attempts(run.id) if a.start_step < a.end_step]
        assert run.status == RunStatus.COMPLETED
    assert resumed == [None, 2, 4]  # first attempt, the retry after freeing space, the second chunk
    assert final_diff(home, "full") == 0.0
    assert full_verify(home, "full") == {}
