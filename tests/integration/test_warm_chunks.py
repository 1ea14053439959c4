"""Warm chunks: a run's chunks share one process (in process) or one child (launcher=subprocess), bit-identically."""

from __future__ import annotations

import gc
import os
import signal
import threading
import weakref

import psutil
import pytest
from ckptflow import run_child, warm
from ckptflow.chunks import train_attempt
from ckptflow.launchers import launch_inprocess, launch_subprocess
from ckptflow.ledger import AttemptStatus, Ledger

from tests.drills import final_diff
from tests.helpers import adapter_weights, max_abs_diff, settings_for, train_without_prefect

pytestmark = pytest.mark.slow

# The drills' run (8 steps, save every 2, keep the 2 most recent), in chunks of 2 steps.
DRILL_RUN = {
    "train": {"max_steps": 8, "chunk_steps": 2},
    "checkpoint": {"save_steps": 2, "eval_steps": 2, "save_total_limit": 2, "retention": "recent"},
}


def test_warm_chunks_are_bit_identical_to_cold_chunks_and_to_one_chunk(home):
    warm_before: list[bool] = []

    def warm_launch(job, plan):
        shared = warm._shared  # what the previous chunk left loaded: tokenizer and data, TRL's prepared datasets
        warm_before.append((shared is not None, shared is not None and shared.prepared is not None))
        launch_inprocess(job, plan)

    def cold_launch(job, plan):
        warm.release()  # every chunk loads everything, as before warm chunks
        train_attempt(job, plan)

    one = settings_for(home, train={"max_steps": 6, "chunk_steps": 6})
    split = settings_for(home, train={"max_steps": 6, "chunk_steps": 2})
    train_without_prefect(one, "one")
    train_without_prefect(split, "warm", launch=warm_launch)
    assert warm._shared is None and gc.get_freeze_count() == 0  # the run's last chunk let go of everything
    train_without_prefect(split, "cold", launch=cold_launch)

    assert warm_before == [(False, False), (True, True), (True, True)]  # chunks 2 and 3 skip TRL's preparation
    final = {name: adapter_weights(split.checkpoints_dir(name) / "checkpoint-6") for name in ("one", "warm", "cold")}
    assert max_abs_diff(final["warm"], final["one"]) == 0.0
    assert max_abs_diff(final["warm"], final["cold"]) == 0.0


def test_one_child_trains_the_chunks_of_a_run_and_a_dead_idle_child_is_replaced(home, monkeypatch):
    """Each chunk is launched from a thread that then ends: the child must outlive it (PDEATHSIG is per thread)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child's numerics match the drills' reference
    pids: list[int | None] = []

    def launch(job, plan):
        if job.chunk == 2:  # the idle child dies between chunks (OOM killer, a stray kill)
            idle = next(iter(run_child._idle.values()))
            os.kill(idle.pid, signal.SIGKILL)
            idle._proc.wait(10)
        failure: list[BaseException] = []
        thread = threading.Thread(target=lambda: _capture(failure, launch_subprocess, job, plan))
        thread.start()
        thread.join()
        if failure:
            raise failure[0]
        pids.append(_idle_pid())

    settings = settings_for(home, **DRILL_RUN)
    try:
        train_without_prefect(settings, "sub", launch=launch)
    finally:
        run_child.close_all()
    first, second = pids[0], pids[2]
    assert pids == [first, first, second, None]  # chunks 0-1 in one child, 2-3 in its replacement; none left after
    assert first != second and not _running(first) and not _running(second)
    with Ledger(settings.ledger) as ledger:
        attempts = ledger.attempts(ledger.get_run("sub").id)
    assert [(a.chunk, a.status) for a in attempts] == [(c, AttemptStatus.COMPLETED) for c in range(4)]
    assert final_diff(home, "sub") == 0.0


def test_a_run_trains_with_the_loaded_objects_frozen_and_an_earlier_runs_garbage_is_collected_first(home):
    """The run's first chunk freezes what is loaded (a one-chunk run too, so its train()'s full collection is
    cheap); the release lets go. A later run in the same process collects before freezing: garbage left in a
    reference cycle by the earlier run (a model, an optimizer) is freed, not kept frozen through the run."""

    class Cycle:
        pass

    settings = settings_for(home, train={"max_steps": 2, "chunk_steps": 2})
    warm.release()
    warm.chunk_inputs(settings, "first", keep=False)  # a one-chunk run
    assert gc.get_freeze_count() > 0 and warm._shared is None
    warm.release()
    assert gc.get_freeze_count() == 0

    gc.disable()  # only an explicit collection may free the cycle
    try:
        garbage = Cycle()
        garbage.self = garbage
        alive = weakref.ref(garbage)
        del garbage
        warm.chunk_inputs(settings, "second", keep=True)
        assert alive() is None
        assert gc.get_freeze_count() > 0
    finally:
        gc.enable()
        warm.release()
    assert gc.get_freeze_count() == 0


@pytest.mark.parametrize(
    ("change", "same"),
    [
        ({}, True),
        ({"run_name": "other"}, False),
        ({"ledger_url": "sqlite:////elsewhere/ledger.db"}, False),
        ({"settings": {"train": {"seed": 7}}}, False),
        ({"settings": {"model": {"lora_r": 4}}}, False),
    ],
)
def test_warm_key_changes_with_the_run_and_its_settings(home, change, same):
    base = {"ledger_url": "sqlite:///l.db", "run_name": "r"}
    settings = settings_for(home)
    args = {**base, **{k: v for k, v in change.items() if k != "settings"}}
    other = settings_for(home, **change["settings"]) if "settings" in change else settings
    key = warm.warm_key(settings, base["ledger_url"], base["run_name"])
    assert (warm.warm_key(other, args["ledger_url"], args["run_name"]) == key) is same


def _capture(failure: list, fn, *args) -> None:
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
        failure.append(exc)


def _idle_pid() -> int | None:
    children = list(run_child._idle.values())
    assert len(children) <= 1
    return children[0].pid if children else None


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
