"""launcher=torchrun with 2 CPU ranks (gloo): real torchrun processes, the real tiny model, a real SQLite ledger.

One chunked torchrun run (steps 0-4, 4-8) and one single-chunk torchrun run are trained once
for the module; the chunked run's home is also copied right after chunk 0, so each kill case
replays only chunk 1. A kill case SIGKILLs rank 1 at a moment it watches in the ledger and the
files (a `fault.pause_at` on rank 0 only makes the moment last), checks that torchrun tore the
whole chunk down, retries the chunk as Prefect would, and compares the final adapter with the
uninterrupted run: max |Δ| must be 0.0.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from ckptflow import pipeline
from ckptflow.chunks import ChunkJob, run_chunk
from ckptflow.errors import BadInputError
from ckptflow.integrity import MANIFEST_NAME
from ckptflow.launchers import ChunkProcessError, launcher
from ckptflow.ledger import AttemptStatus, CheckpointState, Ledger
from ckptflow.planning import chunk_plan

from tests.badinput import assert_refused, assert_unchanged, ckptflow, snapshot
from tests.drills import DRILL_ENV
from tests.helpers import adapter_weights, max_abs_diff, settings_for, train_without_prefect

pytestmark = pytest.mark.slow

RUN = "ddp"
NPROC = 2
LAST_STEP = 8
RANK_FILES = tuple(f"rng_state_{rank}.pth" for rank in range(NPROC))
TORCHRUN = {"launcher": "torchrun", "nproc_per_node": NPROC, "retry_delay_seconds": 0}
# Seconds a watched moment may take to come (a torchrun chunk starts in ~15 s on 2 busy cores).
_WATCH_TIMEOUT = 240


def _overrides(**train) -> dict:
    """The drill settings (8 steps, chunks of 4, save every 2, keep the 2 most recent) under torchrun."""
    out: dict = {}
    for key, value in DRILL_ENV.items():
        group, name = key.removeprefix("CKPTFLOW_").lower().split("__")
        out.setdefault(group, {})[name] = value
    out["train"] |= TORCHRUN | train
    return out


def _chunks(settings):
    return chunk_plan(LAST_STEP, settings.train.chunk_steps, settings.checkpoint.save_steps)


def _final(home: Path) -> dict:
    return adapter_weights(home / "runs" / RUN / "checkpoints" / f"checkpoint-{LAST_STEP}")


def _manifest_files(checkpoint: Path) -> list[str]:
    return [f["path"] for f in json.loads((checkpoint / MANIFEST_NAME).read_text())["files"]]


def _committed(home: Path) -> list[tuple[int, Path]]:
    with Ledger(f"sqlite:///{home / 'ledger.db'}", home=home) as ledger:
        run = ledger.get_run(RUN)
        return [(c.step, Path(c.path)) for c in ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED])]


@dataclass(frozen=True)
class Reference:
    chunked: Path  # home of the uninterrupted chunked run
    after_chunk0: Path  # copy of that home once chunk 0 committed checkpoint-4
    one_chunk: Path  # home of the same run trained as one chunk


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # every rank computes with one thread: same numerics in every run
        for key in [k for k in os.environ if k.startswith("CKPTFLOW_")]:
            mp.delenv(key)
        chunked = settings_for(root / "chunked", **_overrides())
        pipeline.open_or_create_run(chunked, pipeline.prepare(chunked), RUN, False)
        first, second = _chunks(chunked)
        run_chunk(ChunkJob.for_chunk(chunked, RUN, first), launcher("torchrun"))
        shutil.copytree(chunked.home, root / "after-chunk0")
        run_chunk(ChunkJob.for_chunk(chunked, RUN, second), launcher("torchrun"))
        one_chunk = settings_for(root / "one-chunk", **_overrides(chunk_steps=LAST_STEP))
        train_without_prefect(one_chunk, RUN, launch=launcher("torchrun"))
    return Reference(chunked.home, root / "after-chunk0", one_chunk.home)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_chunked_torchrun_run_is_bit_identical_to_one_chunk(reference):
    assert max_abs_diff(_final(reference.chunked), _final(reference.one_chunk)) == 0.0


def test_every_committed_checkpoint_lists_every_ranks_files(reference):
    seen = []
    for home in (reference.after_chunk0, reference.chunked, reference.one_chunk):
        for step, path in _committed(home):
            files = _manifest_files(path)
            assert set(RANK_FILES) <= set(files), f"checkpoint-{step} of {home.name}: {files}"
            seen.append(step)
    assert sorted(set(seen)) == [2, 4, 6, 8]  # 2 and 4 from the copy taken after chunk 0


@dataclass(frozen=True)
class KillMoment:
    """When to kill rank 1: the pause (on rank 0) that widens the moment, and how the test sees it."""

    fault: dict
    moment: Callable[[dict[int, str], Path], bool]  # (ledger states by step, checkpoints dir) -> now?
    resumed_from: int  # where the retry resumes


KILL_MOMENTS = {
    # Chunk 1 has committed checkpoint-6 and trains step 7.
    "mid-chunk": KillMoment({}, lambda states, d: states.get(6) == CheckpointState.COMMITTED, resumed_from=6),
    # Rank 0 has marked checkpoint-6 `writing` and waits; rank 1 saves and waits at the barrier.
    "save-begun": KillMoment(
        {"pause_at": "save-begun", "pause_step": 6, "pause_seconds": 120},
        lambda states, d: states.get(6) == CheckpointState.WRITING,
        resumed_from=4,
    ),
    # Every rank wrote its files; rank 0 wrote the manifest, the ledger row still says `writing`.
    "during-commit": KillMoment(
        {"pause_at": "manifest-written", "pause_step": 6, "pause_seconds": 120},
        lambda states, d: states.get(6) == CheckpointState.WRITING and (d / "checkpoint-6" / MANIFEST_NAME).exists(),
        resumed_from=6,  # the manifest verifies: reconcile commits checkpoint-6
    ),
}


@pytest.mark.parametrize("moment", list(KILL_MOMENTS))
def test_kill_one_rank_tears_the_chunk_down_and_the_retry_is_bit_identical(reference, tmp_path, moment):
    point = KILL_MOMENTS[moment]
    home = tmp_path / "home"
    shutil.copytree(reference.after_chunk0, home)
    killed = settings_for(home, **_overrides(), fault=point.fault)
    chunk1 = _chunks(killed)[1]

    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_chunk, ChunkJob.for_chunk(killed, RUN, chunk1), launcher("torchrun"))
        rank1 = _watch_then_find_rank(home, killed.checkpoints_dir(RUN), point.moment, rank=1, running=running)
        rank1.kill()  # kill -9
        t0 = time.monotonic()
        with pytest.raises(ChunkProcessError) as failed:
            running.result(timeout=120)
        teardown = time.monotonic() - t0
    assert not isinstance(failed.value, BadInputError)  # the flow's retry condition retries it
    assert not _workers_alive(), "a rank survived the teardown"
    assert teardown < 60, f"torchrun took {teardown:.0f}s to tear the chunk down"

    retry = settings_for(home, **_overrides())  # the retry: same run, no fault armed
    run_chunk(ChunkJob.for_chunk(retry, RUN, chunk1), launcher("torchrun"))

    with Ledger(retry.ledger, home=home) as ledger:
        attempts = [(a.chunk, a.attempt, a.status, a.resumed_from_step) for a in ledger.attempts(ledger.get_run(RUN).id)]
    assert attempts[-2:] == [(1, 1, AttemptStatus.FAILED, 4), (1, 2, AttemptStatus.COMPLETED, point.resumed_from)]
    assert max_abs_diff(_final(home), _final(reference.chunked)) == 0.0
    for step, path in _committed(home):
        assert set(RANK_FILES) <= set(_manifest_files(path)), f"checkpoint-{step}"


def test_a_hung_rank_fails_the_chunk_after_ddp_timeout(reference, tmp_path):
    """Rank 0 stalls before its save (a hang); rank 1 waits at the barrier only ddp_timeout_seconds, then the chunk fails."""
    home = tmp_path / "home"
    shutil.copytree(reference.after_chunk0, home)
    hung = settings_for(
        home, **_overrides(ddp_timeout_seconds=5), fault={"pause_at": "save-begun", "pause_step": 6, "pause_seconds": 600}
    )
    t0 = time.monotonic()
    with pytest.raises(ChunkProcessError) as failed:
        run_chunk(ChunkJob.for_chunk(hung, RUN, _chunks(hung)[1]), launcher("torchrun"))
    assert time.monotonic() - t0 < 120  # not the 600 s pause: the timeout ended it
    assert "ddp_timeout_seconds" in str(failed.value).lower() or "timed out" in str(failed.value).lower(), failed.value
    assert not _workers_alive()


def test_changing_nproc_per_node_of_an_existing_run_is_refused(reference, tmp_path):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    shutil.copytree(reference.chunked, home)
    cwd.mkdir()
    env = {**DRILL_ENV, "CKPTFLOW_HOME": str(home), "CKPTFLOW_TRAIN__LAUNCHER": "torchrun"}
    before = snapshot(home, cwd)
    for nproc, shown in (("3", "2 -> 3"), ("1", "2 -> 1")):
        proc = ckptflow("run", "--run-name", RUN, cwd=cwd, env={**env, "CKPTFLOW_TRAIN__NPROC_PER_NODE": nproc})
        assert_refused(proc, mentions=("train.world_size", shown, "CKPTFLOW_TRAIN__NPROC_PER_NODE", "--new"))
    assert_unchanged(before, snapshot(home, cwd))


def _ranks() -> list[psutil.Process]:
    """This test's torchrun workers (descendants running ckptflow.worker with a RANK)."""
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "ckptflow.worker" in proc.cmdline() and "RANK" in proc.environ() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except psutil.Error:
            continue
    return out


def _workers_alive() -> list[psutil.Process]:
    return [p for p in _ranks() if p.is_running()]


def _watch_then_find_rank(home: Path, ckpt_dir: Path, moment, *, rank: int, running) -> psutil.Process:
    """Poll the ledger and the files until `moment` holds; return the process of `rank` (fails on timeout)."""
    deadline = time.monotonic() + _WATCH_TIMEOUT
    with Ledger(f"sqlite:///{home / 'ledger.db'}", home=home) as ledger:
        run_id = ledger.get_run(RUN).id
        while time.monotonic() < deadline:
            assert not running.done(), f"the chunk ended before the moment: {running.exception()!r}"
            states = {c.step: c.state for c in ledger.checkpoints(run_id)}
            if moment(states, ckpt_dir):
                found = [p for p in _ranks() if p.environ().get("RANK") == str(rank)]
                assert len(found) == 1, found
                return found[0]
            time.sleep(0.05)
    raise AssertionError("the moment never came")


@pytest.mark.parametrize(("nproc", "total", "per_epoch"), [(1, 4, 2), (2, 2, 1)])
def test_plan_counts_global_batches(tmp_path, nproc, total, per_epoch):
    """The tutorial's 4 texts, batch 2, 2 epochs: one rank takes 2 steps per epoch, two ranks 1 (global batch 4)."""
    env = {"CKPTFLOW_HOME": str(tmp_path / "home"), "CKPTFLOW_TRAIN__LAUNCHER": "torchrun"}
    env["CKPTFLOW_TRAIN__NPROC_PER_NODE"] = str(nproc)
    proc = ckptflow("plan", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert (plan["total_steps"], plan["steps_per_epoch"]) == (total, per_epoch)


def test_gradient_checkpointing_chunked_run_is_bit_identical_to_one_chunk(tmp_path):
    """train.gradient_checkpointing (HF's name) reaches SFTConfig, and chunking stays exact with it on."""
    finals = []
    for chunk_steps in (4, LAST_STEP):
        home = tmp_path / f"chunks-{chunk_steps}"
        overrides = _overrides(launcher="inprocess", nproc_per_node=1, chunk_steps=chunk_steps, gradient_checkpointing=True)
        settings = settings_for(home, **overrides)
        train_without_prefect(settings, RUN)
        args = _training_args(settings.checkpoints_dir(RUN) / f"checkpoint-{LAST_STEP}")
        assert args.gradient_checkpointing is True
        finals.append(_final(home))
    assert max_abs_diff(*finals) == 0.0


def _training_args(checkpoint: Path):
    """The TrainingArguments HF saved with a checkpoint (training_args.bin)."""
    import torch

    return torch.load(checkpoint / "training_args.bin", weights_only=False)
