"""Checkpoint policies on real runs: plan agrees with the ledger, byte budget, prune --dry-run, free-space guard."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from ckptflow.chunks import run_chunk
from ckptflow.errors import InsufficientDiskError
from ckptflow.ledger import CheckpointState, Ledger
from ckptflow import pipeline
from ckptflow.planner import plan_for_settings
from ckptflow.planning import chunk_plan
from ckptflow.policy import Ckpt, best_step, decide_retention, retention_policy
from ckptflow.training import InjectedFault

from tests.helpers import checkpoint_dirs_on_disk, committed_steps, job_for, settings_for, train_without_prefect

pytestmark = pytest.mark.slow


def _cli(*args: str, cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CKPTFLOW_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "ckptflow.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _plan(tmp_path: Path, home: Path, toml: str, *extra: str) -> dict:
    (tmp_path / "plan.toml").write_text(toml)
    proc = _cli("plan", "--config", "plan.toml", "--json", *extra, cwd=tmp_path, home=home)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _rows(settings, name):
    ledger = Ledger(settings.ledger)
    try:
        return ledger.checkpoints(ledger.get_run(name).id)
    finally:
        ledger.close()


def test_plan_for_the_default_demo_matches_the_real_run(home, tmp_path):
    plan = _plan(tmp_path, home, "")
    settings = settings_for(home)
    name = train_without_prefect(settings, "demo")
    assert [c.step for c in _rows(settings, name)] == plan["save_points"] == [2, 4]
    assert committed_steps(settings, name) == plan["kept_at_end"] == [2, 4]
    assert [(c["start_step"], c["end_step"]) for c in plan["chunks"]] == [(0, 2), (2, 4)]
    real_bytes = max(c.bytes for c in _rows(settings, name))
    assert 0.8 * real_bytes <= plan["bytes_per_checkpoint"] <= 1.5 * real_bytes


SCALED_EXAMPLE = """
[data]
train = "builtin:demo-large"
[train]
max_steps = 40
learning_rate = 0.005
[checkpoint]
save_steps = 2
eval_steps = 2
save_total_limit = 3
retention = "recent"
"""


def test_plan_at_step_matches_a_run_that_died_there(home, tmp_path):
    """The issue's 10,000-step example scaled down: died at 12 → 8, 10, 12 exist (+ an older best); resume from 12."""
    plan = _plan(tmp_path, home, SCALED_EXAMPLE, "--at", "12")
    assert plan["at"]["exist"] == [8, 10, 12] and plan["at"]["resume_from"] == 12
    settings = settings_for(
        home,
        data={"train": "builtin:demo-large"},
        train={"max_steps": 40, "learning_rate": 0.005},
        checkpoint={"save_steps": 2, "eval_steps": 2, "save_total_limit": 3, "retention": "recent"},
        fault={"at_step": 13, "times": 1},
    )
    with pytest.raises(InjectedFault):
        train_without_prefect(settings, "died")
    rows = [c for c in _rows(settings, "died") if c.state == CheckpointState.COMMITTED]
    best = best_step(rows, "eval_loss", False)
    assert {c.step for c in rows} == set(plan["at"]["exist"]) | {best}
    assert set(checkpoint_dirs_on_disk(settings, "died")) == {c.step for c in rows}

    # Run again: resumes from 12 (the newest, not the best) and ends with what the plan said.
    train_without_prefect(settings, "died")
    ledger = Ledger(settings.ledger)
    attempts = ledger.attempts(ledger.get_run("died").id)
    ledger.close()
    assert [a.resumed_from_step for a in attempts if a.chunk == 1] == [10, 12]
    rows = [c for c in _rows(settings, "died") if c.state == CheckpointState.COMMITTED]
    final_plan = _plan(tmp_path, home, SCALED_EXAMPLE)
    assert {c.step for c in rows} == set(final_plan["kept_at_end"]) | {best_step(rows, "eval_loss", False)}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_real_run_with_a_byte_budget_stays_under_it_at_every_commit(home):
    probe = settings_for(home, train={"max_steps": 2})
    train_without_prefect(probe, "probe")
    one = max(c.bytes for c in _rows(probe, "probe"))
    budget = int(3.5 * one)
    settings = settings_for(
        home,
        train={"max_steps": 16, "chunk_steps": 2},
        checkpoint={"save_total_limit": None, "max_total_bytes": budget},
    )
    prepared = pipeline.prepare(settings)
    run = pipeline.open_or_create_run(settings, prepared, "budget", False).run
    for chunk in chunk_plan(run.total_steps, 2, 2):
        run_chunk(job_for(settings, run.name, chunk))
        on_disk = _du(settings.checkpoints_dir(run.name))
        assert on_disk <= budget, f"after step {chunk.end_step}: {on_disk} > {budget}"
    assert len(committed_steps(settings, run.name)) == 3
    pruned = [c for c in _rows(settings, run.name) if c.state == CheckpointState.PRUNED]
    assert pruned and all("max_total_bytes" in c.reason for c in pruned)


def _snapshot(settings, name) -> tuple:
    con = sqlite3.connect(settings.home / "ledger.db")
    try:
        rows = con.execute("select step, state, reason, pruned_at from checkpoints order by step").fetchall()
    finally:
        con.close()
    files = sorted(str(p.relative_to(settings.home)) for p in settings.run_dir(name).rglob("*"))
    return rows, files


def test_prune_dry_run_changes_neither_files_nor_ledger(home, tmp_path):
    settings = settings_for(home, checkpoint={"save_total_limit": None})
    name = train_without_prefect(settings, "keepall")
    (tmp_path / "limit1.toml").write_text('[checkpoint]\nsave_total_limit = 1\nretention = "recent"\n')
    before = _snapshot(settings, name)
    proc = _cli("prune", name, "--dry-run", "--config", "limit1.toml", cwd=tmp_path, home=home)
    assert proc.returncode == 0, proc.stderr
    assert "would prune" in proc.stdout
    assert _snapshot(settings, name) == before

    proc = _cli("prune", name, "--config", "limit1.toml", "--json", cwd=tmp_path, home=home)
    assert proc.returncode == 0, proc.stderr
    decision = json.loads(proc.stdout)
    assert list(decision["keep"]) == ["4"] and list(decision["prune"]) == ["2"]
    assert committed_steps(settings, name) == [4] and checkpoint_dirs_on_disk(settings, name) == [4]


def test_free_space_guard_refuses_a_save_and_loses_nothing(home):
    settings = settings_for(home)
    prepared = pipeline.prepare(settings)
    run = pipeline.open_or_create_run(settings, prepared, "tight", False).run
    first, second = chunk_plan(run.total_steps, 0, 2)
    run_chunk(job_for(settings, run.name, first))
    starved = settings.model_copy(update={"checkpoint": settings.checkpoint.model_copy(update={"min_free_bytes": 10**18})})
    with pytest.raises(InsufficientDiskError, match="CKPTFLOW_CHECKPOINT__MIN_FREE_BYTES"):
        run_chunk(job_for(starved, run.name, second))
    assert committed_steps(settings, run.name) == [2]
    assert checkpoint_dirs_on_disk(settings, run.name) == [2]
    run_chunk(job_for(settings, run.name, second))  # space is back: resumes from 2 and finishes
    assert committed_steps(settings, run.name) == [2, 4]


# -- plan == the real run ------------------------------------------------------------------
# Each config trained for real (tiny model, the demo's 4 train rows, batch 2 unless said) and
# compared with its plan exactly: (settings, expected chunk ends, save points, eval points).
PLAN_EQUALS_RUN = {
    "steps": ({}, [2, 4], [2, 4], [2, 4]),
    "save-strategy-epoch": (
        {"train": {"epochs": 3, "chunk_steps": 3},
         "checkpoint": {"save_strategy": "epoch", "eval_strategy": "epoch", "retention": "recent"}},
        [3, 6], [2, 3, 4, 6], [2, 4, 6],  # saves: epoch ends 2, 4, 6 and the chunk end 3 (not evaluated)
    ),
    "chunk-steps-off-the-save-grid": (
        {"train": {"max_steps": 6, "chunk_steps": 3}, "checkpoint": {"save_total_limit": 3}},
        [3, 6], [2, 3, 4, 6], [2, 4, 6],  # 4 saves > limit 3: the metrics decide what is kept; 3 has none
    ),
    "total-steps-below-eval-steps": (
        {"train": {"max_steps": 3}, "checkpoint": {"save_steps": 4, "eval_steps": 4}},
        [3], [3], [3],
    ),
    "gradient-accumulation": (
        {"train": {"batch_size": 1, "gradient_accumulation_steps": 3, "chunk_steps": 3}, "checkpoint": {"eval_steps": 1}},
        [3, 4], [2, 3, 4], [1, 2, 3, 4],  # 4 batches/epoch = steps of 3 + 1 micro-batches; resumes mid-epoch at 3
    ),
}


def _real_run(settings, name: str) -> dict:
    """What the run really did: attempts (chunks), saves, evaluations, and what is kept at the end."""
    with Ledger(settings.ledger) as ledger:
        run = ledger.get_run(name)
        rows = ledger.checkpoints(run.id)
        attempts = ledger.attempts(run.id)
    final = settings.checkpoints_dir(name) / f"checkpoint-{run.total_steps}" / "trainer_state.json"
    history = json.loads(final.read_text())["log_history"]  # carried over every resume: the whole run
    return {
        "total_steps": run.total_steps,
        "chunks": [(a.start_step, a.end_step) for a in attempts],
        "save_points": [c.step for c in rows],
        "eval_points": [e["step"] for e in history if "eval_loss" in e],
        "kept": [c.step for c in rows if c.state == CheckpointState.COMMITTED],
        "metrics": {c.step: c.metrics for c in rows},
    }


@pytest.mark.parametrize("config", list(PLAN_EQUALS_RUN))
def test_plan_equals_the_real_run(home, config):
    overrides, chunk_ends, saves, evals = PLAN_EQUALS_RUN[config]
    settings = settings_for(home, **overrides)
    plan = plan_for_settings(settings)
    real = _real_run(settings, train_without_prefect(settings, config))

    assert [c.end_step for c in plan.chunks] == chunk_ends
    assert real["total_steps"] == plan.total_steps
    assert real["chunks"] == [(c.start_step, c.end_step) for c in plan.chunks]
    assert real["save_points"] == plan.save_points == saves
    assert real["eval_points"] == plan.eval_points == evals  # each once: no second save/eval at an epoch end
    assert [s for s in saves if "eval_loss" in real["metrics"][s]] == [s for s in saves if s in evals]
    if isinstance(plan.kept_at_end, list):
        assert real["kept"] == plan.kept_at_end
    else:  # retention=best over more saves than the limit: the plan's rule, applied to the real metrics
        ranked = [Ckpt(s, real["metrics"][s]) for s in plan.save_points]
        assert real["kept"] == decide_retention(retention_policy(settings.checkpoint), ranked).kept_steps
        assert len(real["kept"]) <= settings.checkpoint.save_total_limit + 1
    unevaluated = settings.checkpoint.retention == "best" and bool(set(saves) - set(evals))
    assert any("have no eval metric" in w for w in plan.warnings) == unevaluated
