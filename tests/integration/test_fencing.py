"""Concurrency at the edge: a holder whose lease was taken over cannot commit (a real Trainer
chunk), `prune`/`export` never run beside a live training run, a failed directory fsync fails
the commit, a failing launcher kills its child, and artifacts never decide a run's outcome."""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from ckptflow import faults, pipeline
from ckptflow.chunks import AttemptPlan, ChunkJob, run_chunk
from ckptflow.errors import LeaseLostError
from ckptflow.integrity import MANIFEST_NAME, write_manifest
from ckptflow.lease import hold_lease
from ckptflow.ledger import CheckpointState, Ledger
from ckptflow.planning import chunk_plan
from tests.badinput import assert_refused, assert_unchanged, ckptflow, snapshot
from tests.helpers import settings_for

pytestmark = pytest.mark.slow


def _first_chunk_job(settings, run_name: str, holder: str) -> tuple[ChunkJob, int]:
    """Prepare and open the run; the job of its first chunk (steps 0-2) as `holder`."""
    prepared = pipeline.prepare(settings)
    opened = pipeline.open_or_create_run(settings, prepared, run_name, False)
    chunk = chunk_plan(opened.run.total_steps, settings.train.chunk_steps, settings.checkpoint.save_steps)[0]
    return ChunkJob.for_chunk(settings, run_name, chunk, lease_holder=holder), opened.run.id


def _intrude(settings, run_id: int) -> int:
    """Another process's view: the holder went silent, take its lease over. Returns the new token."""
    with Ledger(settings.ledger) as ledger:
        return ledger.take_lease(run_id, "intruder", ttl_seconds=0).fence.token


@pytest.mark.parametrize("launcher", ["inprocess", "subprocess"])
def test_a_chunk_whose_lease_was_taken_over_before_its_first_save_commits_nothing(home, launcher):
    """The fence travels with the attempt's plan, into a child process too."""
    from ckptflow.launchers import launcher as launch_with

    settings = settings_for(home, train={"chunk_steps": 2})
    job, run_id = _first_chunk_job(settings, "fenced", "trainer")

    def taken_over_then_train(job: ChunkJob, plan: AttemptPlan) -> None:
        _intrude(settings, run_id)  # between the attempt's start and its trainer's first save
        launch_with(launcher)(job, plan)

    with hold_lease(settings.ledger, run_id, "trainer"):
        with pytest.raises(LeaseLostError, match="took it over"):  # its heartbeat at step 1 finds out
            run_chunk(job, taken_over_then_train)
    with Ledger(settings.ledger) as ledger:
        assert ledger.checkpoints(run_id) == []  # not even a `writing` row: refused before HF wrote anything
        assert ledger.lease_holder(run_id) == "intruder"  # the old holder's exit did not release it
    assert not settings.checkpoints_dir("fenced").joinpath("checkpoint-2").exists()


def test_a_lease_taken_over_while_files_are_written_stops_the_holder_before_its_manifest(home):
    """Watched, not slept: the take-over happens once the ledger shows checkpoint-2 `writing`."""
    settings = settings_for(
        home, train={"chunk_steps": 2}, fault={"pause_at": "save-begun", "pause_step": 2, "pause_seconds": 3}
    )
    job, run_id = _first_chunk_job(settings, "fenced", "trainer")
    faults._done = False  # a process pauses once; an earlier test in this process may have used it
    outcome: list[BaseException | None] = []

    def train() -> None:
        try:
            run_chunk(job)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            outcome.append(exc)

    with hold_lease(settings.ledger, run_id, "trainer"):
        trainer = threading.Thread(target=train)
        trainer.start()
        with Ledger(settings.ledger) as ledger:
            deadline = time.monotonic() + 120
            while (ck := ledger.get_checkpoint(run_id, 2)) is None or ck.state != CheckpointState.WRITING:
                assert time.monotonic() < deadline and trainer.is_alive(), "checkpoint-2 never started"
                time.sleep(0.02)
        _intrude(settings, run_id)
        trainer.join(timeout=120)
    assert isinstance(outcome[0], LeaseLostError), outcome
    with Ledger(settings.ledger) as ledger:
        assert ledger.get_checkpoint(run_id, 2).state == CheckpointState.WRITING  # never committed
    assert not (settings.checkpoints_dir("fenced") / "checkpoint-2" / MANIFEST_NAME).exists()


@pytest.mark.parametrize("command", [("prune", "base"), ("export", "base", "--no-merge")], ids=["prune", "export"])
def test_prune_and_export_are_refused_while_a_live_process_trains_the_run(completed_home, tmp_path, command):
    settings = settings_for(completed_home)
    with Ledger(settings.ledger) as ledger:
        run_id = ledger.get_run("base").id
    env = {"CKPTFLOW_HOME": str(completed_home)}
    with hold_lease(settings.ledger, run_id, "a-training-run"):  # this test process: alive, heartbeating
        before = snapshot(completed_home, tmp_path)
        refused = ckptflow(*command, cwd=tmp_path, env=env)
        assert_refused(refused, mentions=["already being trained by another process"])
        after = snapshot(completed_home, tmp_path)
    assert_unchanged(_without_lease(before), _without_lease(after))  # the live holder's heartbeats aside
    done = ckptflow(*command, cwd=tmp_path, env=env)  # lease released: fine
    assert done.returncode == 0, done.stdout + done.stderr


def _without_lease(snap: dict) -> dict:
    """The snapshot without the lease row and the ledger file's bytes (its heartbeats change them)."""
    def files(tree: dict) -> dict:
        return {rel: entry for rel, entry in tree.items() if not rel.endswith("ledger.db")}

    return {
        "ledger": [line for line in snap["ledger"] if 'INTO "leases"' not in line],
        "home": files(snap["home"]),
        "cwd": files(snap["cwd"]),
    }


def test_a_failed_directory_fsync_fails_the_commit(tmp_path, monkeypatch):
    """EIO from fsync of a checkpoint directory is an error, not a warning: no manifest, so no commit."""
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "adapter_model.safetensors").write_bytes(os.urandom(1024))
    real_fsync = os.fsync

    def fsync_failing_on_directories(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_failing_on_directories)  # a disk that fails cannot be made on demand
    with pytest.raises(OSError, match="Input/output error"):
        write_manifest(ckpt, step=2, metrics={}, settings_digest="d")
    assert not (ckpt / MANIFEST_NAME).exists()


class _RaiseOnChildLine(logging.Handler):
    """The launcher's parent fails (here: an interrupt) while its child is still training."""

    def __init__(self) -> None:
        super().__init__()
        self.child_pid: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "child-pid=" in text:
            self.child_pid = int(text.rsplit("child-pid=", 1)[1])
            raise KeyboardInterrupt


def test_a_launcher_whose_parent_raises_kills_its_child():
    from ckptflow.launchers import _run_child

    handler = _RaiseOnChildLine()
    handler.raiseExceptions = True
    logger = logging.getLogger("ckptflow.launchers")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    child = "import os, time; print(f'child-pid={os.getpid()}', flush=True); time.sleep(120)"
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            _run_child([sys.executable, "-c", child], ChunkJob("sqlite://", "r", 1, 4, 8, {}), AttemptPlan(1, 1, None, None))
    finally:
        logger.removeHandler(handler)
    assert handler.child_pid is not None and time.monotonic() - t0 < 60
    with pytest.raises(ProcessLookupError):
        os.kill(handler.child_pid, 0)  # killed and reaped, not orphaned


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_failing_artifact_publisher_is_logged_not_raised():
    from tasks.reporting import publish_quietly

    def broken(*_: object) -> None:
        raise ConnectionError("Prefect API unreachable")

    seen = _Collect()
    logging.getLogger("tasks.reporting").addHandler(seen)  # Prefect's logging config does not propagate it
    try:
        assert publish_quietly(broken, "x") is None
    finally:
        logging.getLogger("tasks.reporting").removeHandler(seen)
    assert any("Prefect API unreachable" in m for m in seen.messages)
    with pytest.raises(KeyboardInterrupt):  # only failures of the view are swallowed, never an interrupt
        publish_quietly(lambda: (_ for _ in ()).throw(KeyboardInterrupt()))


def test_prune_beside_no_training_run_takes_and_releases_the_lease(completed_home):
    from ckptflow.retention import apply_retention
    from ckptflow.runs import run_settings

    settings = settings_for(completed_home)
    with Ledger(settings.ledger, home=settings.home) as ledger:
        run = ledger.get_run("base")
        token_before = _token(ledger, run.id)
        apply_retention(ledger, run.id, run_settings(run).checkpoint)
        assert ledger.lease_holder(run.id) is None and _token(ledger, run.id) == token_before + 1


def _token(ledger: Ledger, run_id: int) -> int:
    from sqlalchemy import text

    with ledger._read() as s:
        return s.execute(text("SELECT COALESCE(MAX(token), 0) FROM leases WHERE run_id = :r"), {"r": run_id}).scalar()


def test_the_ledger_of_a_real_run_pins_no_home(completed_home):
    """Checkpoint and export paths are relative, and the recorded settings name no home or ledger URL."""
    import json
    import sqlite3

    con = sqlite3.connect(Path(completed_home) / "ledger.db")
    try:
        paths = [p for (p,) in con.execute("SELECT path FROM checkpoints UNION ALL SELECT path FROM exports")]
        [config] = [json.loads(c) for (c,) in con.execute("SELECT config FROM runs")]
    finally:
        con.close()
    assert sorted(paths) == ["exports/base", "runs/base/checkpoints/checkpoint-2", "runs/base/checkpoints/checkpoint-4"]
    assert not {"home", "ledger_url"} & set(config["settings"])
