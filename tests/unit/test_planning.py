"""Run plans: chunks, save/eval points, what is kept, disk, and where a dead run resumes."""

from __future__ import annotations

import json

import pytest

from ckptflow.planning import (
    DEFAULT_MIN_FREE_BYTES,
    AtStep,
    Chunk,
    auto_chunk_steps,
    chunk_plan,
    estimate_checkpoint_bytes,
    eval_points,
    make_plan,
    run_schedule,
    save_points,
    schedule_for,
)
from ckptflow.settings import CheckpointSettings, load_settings

MB = 1_000_000
GB = 1_000_000_000
EVERY_500 = dict(save_steps=500, eval_steps=500, save_total_limit=3)


def plan(at_step=None, *, total=10000, per_epoch=10000, chunk=0, size=MB, free=100 * GB, **settings):
    ck = CheckpointSettings(**settings)
    return make_plan(
        ck,
        run_schedule(ck, total_steps=total, steps_per_epoch=per_epoch, chunk_steps=chunk),
        bytes_per_checkpoint=size,
        free_bytes=free,
        at_step=at_step,
    )


# -- chunks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "save", "expected"),
    [(4, 2, 2), (10000, 500, 2500), (10, 2, 4), (3, 5, 5), (1, 1, 1), (100, 1, 25), (9, 3, 3)],
)
def test_auto_chunk_steps(total, save, expected):
    assert auto_chunk_steps(total, save) == expected


@pytest.mark.parametrize(("total", "save"), [(0, 2), (4, 0)])
def test_auto_chunk_steps_refuses_non_positive(total, save):
    with pytest.raises(ValueError, match="must be positive"):
        auto_chunk_steps(total, save)


@pytest.mark.parametrize(
    ("total", "chunk", "save", "expected"),
    [
        (4, 0, 2, [(0, 0, 2), (1, 2, 4)]),
        (10, 4, 2, [(0, 0, 4), (1, 4, 8), (2, 8, 10)]),
        (5, 10, 2, [(0, 0, 5)]),
        (6, 3, 100, [(0, 0, 3), (1, 3, 6)]),
    ],
)
def test_chunk_plan(total, chunk, save, expected):
    assert chunk_plan(total, chunk, save) == [Chunk(*c) for c in expected]


def test_chunk_plan_refuses_negative():
    with pytest.raises(ValueError, match="chunk_steps"):
        chunk_plan(10, -1, 2)


# -- save and eval points --------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "total", "per_epoch", "chunk_ends", "expected"),
    [
        (dict(save_steps=2), 4, 2, [2, 4], [2, 4]),
        (dict(save_steps=4, eval_steps=2), 10, 5, [3, 10], [3, 4, 8, 10]),  # chunk ends forced
        (dict(save_strategy="epoch", eval_strategy="epoch"), 10, 4, [], [4, 8, 10]),  # last step always
        (dict(save_strategy="epoch", eval_strategy="epoch"), 9, 3, [6, 9], [3, 6, 9]),
    ],
)
def test_save_points(settings, total, per_epoch, chunk_ends, expected):
    chunks = [Chunk(i, 0, end) for i, end in enumerate(chunk_ends)]
    assert save_points(total, CheckpointSettings(**settings), per_epoch, chunks) == expected


@pytest.mark.parametrize(
    ("settings", "total", "per_epoch", "expected"),
    [
        (dict(eval_steps=2), 4, 2, [2, 4]),
        (dict(eval_steps=3), 10, 5, [3, 6, 9, 10]),  # HF evaluates the last step too
        (dict(eval_steps=5), 3, 5, [3]),  # fewer steps than eval_steps: the end is evaluated
        (dict(eval_strategy="epoch"), 10, 4, [4, 8, 10]),  # the last, partial epoch ends at 10
        (dict(eval_strategy="no", retention="recent"), 10, 4, []),
    ],
)
def test_eval_points(settings, total, per_epoch, expected):
    assert eval_points(total, CheckpointSettings(**settings), per_epoch) == expected


@pytest.mark.parametrize(
    ("train", "checkpoint", "rows", "total", "expected"),
    [
        # (train settings, checkpoint settings, train rows, total steps) → (steps/epoch, chunk ends, saves, evals)
        ({}, {}, 4, 4, (2, [2, 4], [2, 4], [2, 4])),
        ({"chunk_steps": 3}, {}, 4, 4, (2, [3, 4], [2, 3, 4], [2, 4])),  # chunk ends are not evaluated
        ({"gradient_accumulation_steps": 3, "batch_size": 1}, {}, 5, 4, (2, [2, 4], [2, 4], [2, 4])),
        # save_strategy=epoch: auto chunks are whole epochs (not save_steps long)
        ({}, {"save_strategy": "epoch", "eval_strategy": "epoch", "save_steps": 1}, 12, 12, (6, [6, 12], [6, 12], [6, 12])),
    ],
)
def test_schedule_for_settings(home, train, checkpoint, rows, total, expected):
    s = schedule_for(load_settings(train=train, checkpoint=checkpoint), total_steps=total, train_rows=rows)
    assert (s.steps_per_epoch, [c.end_step for c in s.chunks], s.save_points, s.eval_points) == expected


@pytest.mark.parametrize(
    ("trainable", "kwargs", "expected"),
    [
        (1000, {}, 1000 * 4 + 1000 * 8 + 64 * 1024),
        (1000, dict(param_bytes=2, extra_bytes=0), 1000 * 2 + 1000 * 8),
        (0, {}, 64 * 1024),
    ],
)
def test_estimate_checkpoint_bytes(trainable, kwargs, expected):
    assert estimate_checkpoint_bytes(trainable, **kwargs) == expected


# -- whole plans -----------------------------------------------------------------------


def test_default_demo():
    p = plan(total=4, per_epoch=2)
    assert p.chunks == [Chunk(0, 0, 2), Chunk(1, 2, 4)]
    assert (p.save_points, p.eval_points, p.checkpoints_on_disk_max) == ([2, 4], [2, 4], 2)
    assert (p.kept_at_end, p.rule) == ([2, 4], "all 2 saves")
    assert (p.disk_needed_bytes, p.fits, p.warnings, p.at) == (2 * MB, True, [], None)


def test_10000_steps_recent():
    p = plan(retention="recent", **EVERY_500)
    assert [c.end_step for c in p.chunks] == [2500, 5000, 7500, 10000]
    assert p.save_points == p.eval_points == list(range(500, 10001, 500))
    assert p.kept_at_end == [9000, 9500, 10000]
    assert p.rule == "the 3 most recent of the 20 saves, plus the best by eval_loss if it is older"
    assert p.checkpoints_on_disk_max == 5  # 3 + an older best + the one being written
    assert p.disk_needed_bytes == 5 * MB


def test_10000_steps_best():
    p = plan(**EVERY_500)
    assert p.kept_at_end == p.rule
    assert p.rule == "the 3 best by eval_loss (lowest) among the 20 saves, plus the newest (step 10000)"
    assert p.checkpoints_on_disk_max == 5


def test_best_rule_greater_is_better_and_milestones():
    p = plan(metric_for_best_model="mean_token_accuracy", greater_is_better=True, keep_every_steps=5000, **EVERY_500)
    assert p.rule.startswith("the 3 best by eval_mean_token_accuracy (highest) among the 20 saves")
    assert "plus milestones every 5000 steps" in p.rule
    assert p.checkpoints_on_disk_max == 7  # + the 2 milestones 5000 and 10000


@pytest.mark.parametrize(
    ("retention", "died_at", "saved", "exist", "rule_fragment", "resume"),
    [
        ("recent", 3000, range(500, 3001, 500), [2000, 2500, 3000], "plus the best by eval_loss if it is older", 3000),
        ("recent", 3100, range(500, 3001, 500), [2000, 2500, 3000], "the 3 most recent saves up to step 3000", 3000),
        ("recent", 400, [], [], "starts from scratch", None),
        ("recent", 1000, [500, 1000], [500, 1000], "all 2 saves so far (500..1000)", 1000),
        ("best", 3000, range(500, 3001, 500), [3000],
         "the 3 best by eval_loss among steps 500..3000, plus the newest (3000)", 3000),
        ("best", 3499, range(500, 3001, 500), [3000], "plus the newest (3000)", 3000),  # not the best: resume newest
        ("best", 1500, [500, 1000, 1500], [500, 1000, 1500], "all 3 saves so far", 1500),
        ("best", 10000, range(500, 10001, 500), [10000], "among steps 500..10000", 10000),
    ],
)
def test_at_step(retention, died_at, saved, exist, rule_fragment, resume):
    at = plan(died_at, retention=retention, **EVERY_500).at
    assert at == AtStep(died_at, list(saved), exist, at.exist_rule, resume)
    assert rule_fragment in at.exist_rule


def test_at_step_recent_uses_the_real_policy_with_milestones_and_budget():
    at = plan(3000, retention="recent", keep_every_steps=1000, **EVERY_500).at
    assert at.exist == [1000, 2000, 2500, 3000]
    at = plan(3000, retention="recent", max_total_bytes=2 * MB, **EVERY_500).at
    assert at.exist == [2500, 3000]


def test_at_step_best_certain_milestones():
    at = plan(3000, keep_every_steps=1000, **EVERY_500).at
    assert at.exist == [1000, 2000, 3000]
    assert "plus milestones every 1000 steps" in at.exist_rule


def test_epoch_strategy():
    p = plan(total=10, per_epoch=4, save_strategy="epoch", eval_strategy="epoch", save_total_limit=2)
    assert [c.end_step for c in p.chunks] == [4, 8, 10]  # auto chunk = one epoch
    assert p.save_points == p.eval_points == [4, 8, 10]
    assert p.warnings == []


def test_chunk_ends_off_eval_grid_warn_under_best():
    p = plan(total=10, per_epoch=10, chunk=3, save_steps=2, eval_steps=2)
    assert p.save_points == [2, 3, 4, 6, 8, 9, 10]
    assert p.eval_points == [2, 4, 6, 8, 10]  # the last step is evaluated (as HF does), chunk ends are not
    [warning] = p.warnings
    assert "saves at chunk ends 3, 9 have no eval metric" in warning
    assert "CKPTFLOW_TRAIN__CHUNK_STEPS a multiple of CKPTFLOW_CHECKPOINT__EVAL_STEPS" in warning


def test_last_step_off_the_eval_grid_is_evaluated_so_no_warning():
    p = plan(total=5, per_epoch=5, save_steps=2, eval_steps=2)
    assert (p.save_points, p.eval_points, p.warnings) == ([2, 4, 5], [2, 4, 5], [])


def test_epoch_strategy_chunk_end_off_the_epoch_warns_in_epochs():
    p = plan(total=6, per_epoch=2, chunk=3, save_strategy="epoch", eval_strategy="epoch", save_total_limit=2)
    assert (p.save_points, p.eval_points) == ([2, 3, 4, 6], [2, 4, 6])
    [warning] = p.warnings
    assert "saves at chunk ends 3 have" in warning and "a multiple of one epoch (2 steps)" in warning


@pytest.mark.parametrize(
    ("settings", "size", "free", "needed", "fits"),
    [
        (dict(), MB, 5 * MB + DEFAULT_MIN_FREE_BYTES, 5 * MB, True),
        (dict(), MB, 5 * MB + DEFAULT_MIN_FREE_BYTES - 1, 5 * MB, False),
        (dict(min_free_bytes=0), MB, 5 * MB, 5 * MB, True),
        (dict(min_free_bytes=MB), MB, 6 * MB - 1, 5 * MB, False),
        (dict(max_total_bytes=3 * MB), MB, GB, 3 * MB, True),
        (dict(max_total_bytes=MB // 2), MB, GB, 2 * MB, True),  # protected newest + best exceed the budget
        (dict(save_total_limit=None), MB, GB, 20 * MB, True),
    ],
)
def test_disk_fit(settings, size, free, needed, fits):
    p = plan(size=size, free=free, **{**EVERY_500, **settings})
    assert (p.disk_needed_bytes, p.fits) == (needed, fits)
    not_fit = [w for w in p.warnings if "is free" in w]
    assert bool(not_fit) == (not fits)
    assert all("CKPTFLOW_CHECKPOINT__SAVE_TOTAL_LIMIT" in w and "MAX_TOTAL_BYTES" in w for w in not_fit)


def test_budget_smaller_than_one_checkpoint_warns():
    p = plan(max_total_bytes=MB // 2, **EVERY_500)
    assert any("smaller than one checkpoint" in w and "CKPTFLOW_CHECKPOINT__MAX_TOTAL_BYTES" in w for w in p.warnings)


def test_to_json_is_plain_json():
    p = plan(3000, retention="recent", **EVERY_500)
    doc = p.to_json()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["chunks"][0] == {"index": 0, "start_step": 0, "end_step": 2500}
    assert doc["at"]["exist"] == [2000, 2500, 3000] and doc["at"]["resume_from"] == 3000
    assert plan(total=4, per_epoch=2).to_json()["at"] is None
