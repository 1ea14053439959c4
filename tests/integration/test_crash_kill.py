"""Kill it anywhere, run it again, get the same weights.

Each case SIGKILLs a real `ckptflow run` process (the `finetune` flow, reporting to the
session's Prefect server) at a moment chosen by watching the ledger and the files (a
`fault.pause_at` only makes the moment last long enough to be seen), checks that nothing
committed is partial, runs the same command again to completion and compares the final
adapter (checkpoint-8) and the export with an uninterrupted run: max |Δ| must be 0.0.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from ckptflow.ledger import AttemptStatus, CheckpointState, RunStatus
from ckptflow.recovery import ABANDONED_ERROR, PRUNING_PREFIX

from tests.drills import (
    DRILL_ENV,
    Driver,
    State,
    Watcher,
    cli,
    committed_checkpoints_verify,
    export_diff,
    final_diff,
    full_verify,
    pause_env,
    run_driver,
    session_server,
)
from tests.helpers import ADAPTER_FILE

pytestmark = pytest.mark.slow

COMMITTED, PRUNED, WRITING = CheckpointState.COMMITTED, CheckpointState.PRUNED, CheckpointState.WRITING
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.json"
# What an uninterrupted drill run keeps at the end (retention=recent, limit 2).
FINAL_COMMITTED = [6, 8]


@dataclass(frozen=True)
class KillPoint:
    """Where to kill: the pause that widens the moment, the state that identifies it, checks at that instant."""

    env: dict[str, str]
    moment: Callable[[State], bool]
    at_kill: Callable[[State], bool] = lambda s: True
    quarantined: tuple[int, ...] = ()  # checkpoint steps expected in quarantine/ after the rerun
    training: bool = True  # killed while an attempt was running (the rerun abandons it)
    logged_pause: bool = False  # also wait for the process to log that it paused (a state no file or row shows)


def _tmp_export(s: State) -> bool:
    return any(".tmp-" in name for name in s.export_leftovers())


KILL_POINTS: dict[str, KillPoint] = {
    # 1. Training has started (attempt row running) but nothing was ever saved.
    "before-first-save": KillPoint(
        pause_env("step-end", 1),
        lambda s: s.running(0) is not None and not s.rows,
        at_kill=lambda s: not s.ckpt(2).exists(),
    ),
    # 2. The ledger says checkpoint-2 is being written; HF has not created its directory yet.
    "save-begun": KillPoint(
        pause_env("save-begun", 2),
        lambda s: s.state(2) == WRITING,
        at_kill=lambda s: s.state(2) == WRITING and not s.ckpt(2).exists(),
    ),
    # 3. During the first save: adapter weights on disk, optimizer state not yet, no manifest.
    "mid-first-save": KillPoint(
        pause_env("mid-save", 2),
        lambda s: s.has_file(2, ADAPTER_FILE) and not s.has_file(2, OPTIMIZER) and s.state(2) == WRITING,
        at_kill=lambda s: s.state(2) == WRITING and not s.has_manifest(2),
        quarantined=(2,),
    ),
    # 4. Between saves: checkpoint-2 committed, step 3 done, nothing of checkpoint-4 yet.
    "between-saves": KillPoint(
        pause_env("step-end", 3),
        lambda s: s.committed() == [2] and 4 not in s.rows,
    ),
    # 5. HF wrote every file of the chunk-boundary checkpoint-4; its background commit has not started.
    "files-written-no-manifest": KillPoint(
        pause_env("files-written", 4),
        lambda s: s.has_file(4, TRAINER_STATE) and not s.has_manifest(4),
        at_kill=lambda s: s.state(4) == WRITING,
        quarantined=(4,),
        # The files show before the committer thread has recorded the `writing` row under load: kill in its pause.
        logged_pause=True,
    ),
    # 6. Manifest renamed into place, ledger row still `writing`: reconcile commits it from the manifest.
    "manifest-before-ledger-commit": KillPoint(
        pause_env("manifest-written", 4),
        lambda s: s.has_manifest(4) and s.state(4) == WRITING,
    ),
    # 7. The second chunk resumed from checkpoint-4 and trained a step: its attempt row stays `running`.
    "second-chunk-after-resume": KillPoint(
        pause_env("step-end", 5),
        lambda s: (a := s.running(1)) is not None and a.resumed_from_step == 4 and 6 not in s.rows,
    ),
    # 8. Pruning checkpoint-2 (retention after 6 commits, in the background): ledger row says pruned,
    #    directory untouched; training went on and wrote checkpoint-8, whose commit waits behind.
    "prune-after-ledger-mark": KillPoint(
        pause_env("prune-marked", 2),
        lambda s: s.state(2) == PRUNED and s.ckpt(2).is_dir() and s.has_file(8, TRAINER_STATE),
        at_kill=lambda s: not s.has_manifest(8),
        quarantined=(8,),
    ),
    # 9. Pruning checkpoint-2: renamed to .pruning-checkpoint-2, not yet deleted (checkpoint-8 as in 8.).
    "prune-mid-delete": KillPoint(
        pause_env("prune-renamed", 2),
        lambda s: (s.checkpoints_dir / f"{PRUNING_PREFIX}checkpoint-2").is_dir() and s.has_file(8, TRAINER_STATE),
        at_kill=lambda s: s.state(2) == PRUNED and not s.ckpt(2).exists() and not s.has_manifest(8),
        quarantined=(8,),
    ),
    # 10. During the last save: checkpoint-8 has its adapter weights, not its optimizer state.
    "mid-last-save": KillPoint(
        pause_env("mid-save", 8),
        lambda s: s.has_file(8, ADAPTER_FILE) and not s.has_file(8, OPTIMIZER) and s.state(8) == WRITING,
        at_kill=lambda s: s.state(8) == WRITING,
        quarantined=(8,),
    ),
    # 11. The last checkpoint has its manifest, the ledger does not know it is complete.
    "last-manifest-before-ledger-commit": KillPoint(
        pause_env("manifest-written", 8),
        lambda s: s.has_manifest(8) and s.state(8) == WRITING,
    ),
    # 12. Pruning after the attempt completed (checkpoint-4 was protected while resumed from).
    "prune-at-attempt-end": KillPoint(
        pause_env("prune-marked", 4),
        lambda s: s.state(4) == PRUNED and s.ckpt(4).is_dir(),
        at_kill=lambda s: s.committed() == [6, 8],
        training=False,
    ),
    # -- inside the background commit (the committer thread; training runs on to the chunk end and waits there)
    # 13. Training ran ahead: the commit of checkpoint-2 has not started, checkpoint-4 is written too.
    "training-ahead-of-commit": KillPoint(
        pause_env("files-written", 2),
        lambda s: s.state(2) == WRITING and s.has_file(4, TRAINER_STATE),
        at_kill=lambda s: s.committed() == [] and not s.has_manifest(2) and not s.has_manifest(4),
        quarantined=(2, 4),
    ),
    # 14. Every file of checkpoint-4 hashed and fsynced, the manifest not written.
    "hashed-before-manifest": KillPoint(
        pause_env("files-hashed", 4),
        lambda s: s.state(4) == WRITING and s.has_file(4, TRAINER_STATE),
        at_kill=lambda s: s.committed() == [2] and not s.has_manifest(4),
        quarantined=(4,),
        logged_pause=True,
    ),
    # 15. The ledger row of checkpoint-6 committed, its retention (pruning checkpoint-2) not run yet.
    "committed-before-retention": KillPoint(
        pause_env("commit-recorded", 6),
        lambda s: s.committed() == [2, 4, 6] and s.has_file(8, TRAINER_STATE),
        at_kill=lambda s: s.ckpt(2).is_dir() and not s.has_manifest(8),
        quarantined=(8,),
        logged_pause=True,
    ),
    # 16. During the export: written to a temp dir beside the target, not swapped in.
    "export-before-swap": KillPoint(
        pause_env("export-written"),
        _tmp_export,
        at_kill=lambda s: not s.export_dir.exists() and s.exports == 0,
        training=False,
    ),
    # 17. Export swapped into place, not yet recorded in the ledger.
    "export-before-ledger-record": KillPoint(
        pause_env("export-swapped"),
        lambda s: (s.export_dir / "model.safetensors").is_file() and s.exports == 0,
        training=False,
    ),
}


@pytest.mark.parametrize("name", list(KILL_POINTS))
def test_sigkill_then_rerun_is_bit_identical(home, name):
    point = KILL_POINTS[name]
    run = f"kill-{name}"
    watcher = Watcher(home, run)
    try:
        # 1. Train until the moment is observed, then SIGKILL.
        driver = Driver(home, run, point.env)
        watcher.wait_for(point.moment, driver, name)
        if point.logged_pause:
            _wait_logged_pause(driver, point.env["CKPTFLOW_FAULT__PAUSE_AT"])
        driver.kill()
        killed = watcher.state()
        assert point.at_kill(killed), f"state at kill: {killed}"
        assert committed_checkpoints_verify(home, run) == {}, "a committed checkpoint is partial"
        assert killed.lease is not None  # the dead process's lease is still in the ledger

        # 2. The same run again, without the pause: takes the lease over, reconciles, resumes, finishes.
        code, out = run_driver(home, run)
        assert code == 0, out
        done = watcher.state()
    finally:
        watcher.close()
    assert done.run.status == RunStatus.COMPLETED
    assert final_diff(home, run) == 0.0
    assert export_diff(home, run) == 0.0
    assert done.committed() == FINAL_COMMITTED
    assert full_verify(home, run) == {}  # no partial or unknown directory left among the checkpoints
    assert done.lease is None and done.export_leftovers() == []
    assert not list(done.checkpoints_dir.glob(f"{PRUNING_PREFIX}*"))
    assert all(a.status != AttemptStatus.RUNNING for a in done.attempts)
    abandoned = [a for a in done.attempts if a.error == ABANDONED_ERROR]
    assert len(abandoned) == (1 if point.training else 0), done.attempts
    quarantine = home / "runs" / run / "quarantine"
    found = sorted({int(p.name.split("-")[1]) for p in quarantine.glob("checkpoint-*")}) if quarantine.exists() else []
    assert found == list(point.quarantined)
    for step in point.quarantined:
        assert done.rows[step].state in (COMMITTED, PRUNED)  # saved again by the rerun


def _wait_logged_pause(driver: Driver, point: str, timeout: float = 120.0) -> None:
    """Until the process logged that it paused at `point` (ckptflow.faults.pause)."""
    deadline = time.monotonic() + timeout
    while f"pausing 120s at {point} " not in driver.output():
        assert driver.alive() and time.monotonic() < deadline, f"no pause at {point}:\n{driver.output()[-3000:]}"
        time.sleep(0.02)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_killed_reexport_leaves_the_previous_export_intact_and_is_redone(home):
    code, out = run_driver(home, "reexport")
    assert code == 0, out
    target = home / "exports" / "reexport"
    before = _tree_digest(target)
    watcher = Watcher(home, "reexport")
    try:
        # `ckptflow export` of the finished run again, killed when the new export is complete in its temp dir.
        proc = Driver(home, "reexport", pause_env("export-written"), command="export")
        watcher.wait_for(
            lambda s: any((s.export_dir.parent / n / "ckptflow-provenance.json").is_file() for n in s.export_leftovers()),
            proc,
            "the new export written to its temp dir",
        )
        proc.kill()
        assert _tree_digest(target) == before  # the previous export, byte for byte
        assert watcher.state().export_leftovers() != []
        code, out = run_driver(home, "reexport", command="export")
        assert code == 0, out
        done = watcher.state()
    finally:
        watcher.close()
    assert done.export_leftovers() == [] and done.exports == 2
    assert _tree_digest(target).keys() == before.keys()
    assert export_diff(home, "reexport") == 0.0


def test_export_moved_aside_by_a_killed_non_atomic_swap_is_restored(tmp_path):
    """Where renameat2(RENAME_EXCHANGE) is unavailable the swap takes two renames; a kill between them is undone."""
    from ckptflow.export import _recover_interrupted

    target = tmp_path / "exports" / "r"
    old = target.with_name(".r.old-999999999")  # pid that cannot be alive
    old.mkdir(parents=True)
    (old / "model.safetensors").write_bytes(b"previous")
    (old / "ckptflow-provenance.json").write_text("{}")  # an earlier export: ckptflow's to restore
    tmp = target.with_name(".r.tmp-999999999")
    tmp.mkdir()
    (tmp / ".ckptflow-export-in-progress").write_text("")  # ckptflow's marked temp dir: to delete
    _recover_interrupted(target)
    assert (target / "model.safetensors").read_bytes() == b"previous"
    assert sorted(p.name for p in target.parent.iterdir()) == ["r"]


def test_kill_whole_ckptflow_run_process_group_then_same_command_resumes(home):
    import psutil

    env = {
        **DRILL_ENV,
        "CKPTFLOW_TRAIN__CHUNK_STEPS": "8",  # one chunk: one child process per `ckptflow run`
        "CKPTFLOW_TRAIN__LAUNCHER": "subprocess",
        "CKPTFLOW_TRAIN__RETRY_DELAY_SECONDS": "0",
        **session_server().env,
    }
    watcher = Watcher(home, "group")
    proc = cli(
        "run", "--run-name", "group", home=home, env={**env, **pause_env("step-end", 7)},
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # 1. Kill flow + tasks + the chunk's child process at once, mid-chunk (checkpoint-6 committed).
        st = watcher.wait_for(lambda s: s.running(0) is not None and 6 in s.committed(), proc, "checkpoint-6 committed")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("ckptflow.worker" in " ".join(c.cmdline()) for c in children)  # training runs in a child
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        psutil.wait_procs(children, timeout=10)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        killed = watcher.state()
        assert killed.lease is not None and killed.running(0) is not None
        assert committed_checkpoints_verify(home, "group") == {}

        # 2. The same command again: takes over the dead lease, abandons the stale attempt, resumes from 6.
        again = cli("run", "--run-name", "group", home=home, env=env)
        assert again.returncode == 0, again.stderr[-4000:]
        done = watcher.state()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        watcher.close()
    assert "took over the lease" in again.stderr
    assert done.run.status == RunStatus.COMPLETED and done.lease is None
    stale = next(a for a in done.attempts if a.id == st.running(0).id)
    assert (stale.status, stale.error) == (AttemptStatus.FAILED, ABANDONED_ERROR)
    assert [a.resumed_from_step for a in done.attempts if a.status == AttemptStatus.COMPLETED] == [6]
    assert final_diff(home, "group") == 0.0
    assert export_diff(home, "group") == 0.0


def test_every_pause_point_is_a_valid_setting():
    from typing import get_args

    from ckptflow.faults import PAUSE_POINTS
    from ckptflow.settings import FaultSettings

    literal = next(a for a in get_args(FaultSettings.model_fields["pause_at"].annotation) if a is not type(None))
    assert set(get_args(literal)) == set(PAUSE_POINTS)
