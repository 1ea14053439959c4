"""Retention and save policies: tables of (settings, checkpoints) → kept steps and reasons."""

from __future__ import annotations

import math
import random

import pytest

from ckptflow.policy import (
    AnySave,
    AtSteps,
    ByteBudget,
    Ckpt,
    EveryNSteps,
    FinalStep,
    KeepBest,
    KeepMilestones,
    KeepNewest,
    ProtectBest,
    ProtectNewest,
    ProtectSteps,
    RetentionPolicy,
    best_step,
    decide_retention,
    format_bytes,
    metric_value,
    rank_best,
    retention_policy,
    save_policy,
)
from ckptflow.settings import CheckpointSettings

NAN, INF = math.nan, math.inf
MB = 1_000_000


def ckpts(*rows: tuple) -> list[Ckpt]:
    """Rows (step, value or None[, bytes[, metric]]) → Ckpt; the metric defaults to eval_loss."""
    out = []
    for step, value, *rest in rows:
        size = rest[0] if rest else 0
        metric = rest[1] if len(rest) > 1 else "eval_loss"
        out.append(Ckpt(step, {} if value is None else {metric: value}, size))
    return out


def decide(checkpoints, protected=(), **settings):
    return decide_retention(retention_policy(CheckpointSettings(**settings)), checkpoints, protected)


# -- best_step -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "greater", "expected"),
    [
        ([], False, None),
        ([(2, None), (4, None)], False, None),
        ([(2, 1.0), (4, 0.5), (6, 0.7)], False, 4),
        ([(2, 1.0), (4, 0.5), (6, 0.7)], True, 2),
        ([(2, 0.5), (4, 0.5), (6, 0.5)], False, 2),  # ties → earliest
        ([(6, 0.5), (2, 0.5), (4, 0.5)], True, 2),  # ties → earliest, whatever the input order
        ([(2, NAN), (4, 0.9)], False, 4),  # NaN never best
        ([(2, -INF), (4, 0.9)], False, 4),  # -inf loss is a broken eval, never best
        ([(2, INF), (4, 0.1)], True, 4),
        ([(2, NAN), (4, INF)], False, None),
        ([(10, 2.0), (9, 1.0)], False, 9),  # numeric steps, not string order
    ],
)
def test_best_step(rows, greater, expected):
    assert best_step(ckpts(*rows), "eval_loss", greater) == expected


def test_best_step_ignores_non_numeric_and_other_metrics():
    checkpoints = [Ckpt(2, {"eval_loss": "0.1"}), Ckpt(4, {"eval_entropy": 0.1}), Ckpt(6, {"eval_loss": 3.0})]
    assert best_step(checkpoints, "eval_loss", False) == 6


@pytest.mark.parametrize(
    ("rows", "greater", "order"),
    [
        ([(2, 1.0), (4, 0.5), (6, 0.7)], False, [4, 6, 2]),
        ([(2, 1.0), (4, 0.5), (6, 0.7)], True, [2, 6, 4]),
        ([(2, 0.5), (6, 0.5), (4, 0.5)], False, [2, 4, 6]),  # ties → earlier first
        ([(2, None), (4, 0.9), (6, None), (8, NAN)], False, [4, 8, 6, 2]),  # no finite metric: last, newest first
        ([(2, None), (10, None), (4, None)], False, [10, 4, 2]),  # nothing evaluated: newest first (export's choice)
    ],
)
def test_rank_best_is_the_one_order(rows, greater, order):
    ranked = rank_best(ckpts(*rows), "eval_loss", greater)
    assert [c.step for c in ranked] == order
    assert best_step(ckpts(*rows), "eval_loss", greater) == next(
        (c.step for c in ranked if metric_value(c, "eval_loss") is not None), None
    )


# -- decide_retention: tables ----------------------------------------------------------

ACC = "eval_mean_token_accuracy"
# 10 saves; the 3 best by eval_loss are 300, 800, 500 — the newest (1000) is the worst
LOSSES_10 = list(zip(range(100, 1100, 100), [5.0, 4.0, 1.0, 3.0, 1.5, 2.0, 6.0, 1.2, 7.0, 8.0]))


@pytest.mark.parametrize(
    ("settings", "rows", "protected", "kept", "reasons"),
    [
        pytest.param(
            dict(retention="best", save_total_limit=3),
            LOSSES_10,
            (),
            {300, 500, 800, 1000},
            {
                300: "best eval_loss=1",
                500: "top-3 by eval_loss",
                1000: "newest (resume point)",
                100: "not among the 3 best",
            },
            id="best-3-of-10-plus-newest",
        ),
        pytest.param(
            dict(retention="recent", save_total_limit=3),
            LOSSES_10,
            (),
            {300, 800, 900, 1000},
            {300: "best eval_loss=1", 800: "3 most recent", 100: "older than the 3 most recent"},
            id="recent-3-of-10-plus-best",
        ),
        pytest.param(
            dict(retention="best", save_total_limit=3),
            [(100, 5.0), (200, 1.0), (300, 2.0), (400, 3.0)],
            (),
            {200, 300, 400},
            {400: "newest (resume point); top-3 by eval_loss"},
            id="best-newest-among-the-best",
        ),
        pytest.param(
            dict(retention="best", save_total_limit=2),
            [(100, 1.0), (200, 1.0), (300, 1.0), (400, 1.0)],
            (),
            {100, 200, 400},
            {100: "best eval_loss=1", 300: "not among the 2 best"},
            id="best-ties-favor-earliest",
        ),
        pytest.param(
            dict(retention="best", save_total_limit=2),
            [(100, NAN), (200, 3.0), (300, NAN), (400, 2.0), (500, NAN)],
            (),
            {200, 400, 500},
            {400: "best eval_loss=2", 100: "no finite eval_loss", 500: "newest"},
            id="best-nan-ranks-last",
        ),
        pytest.param(
            dict(retention="best", save_total_limit=2),
            [(100, None), (200, None), (300, 4.0), (400, None)],
            (),
            {300, 400},
            {300: "best eval_loss=4", 200: "not among the 2 best by eval_loss (no finite eval_loss)"},
            id="best-missing-metric-below-finite",
        ),
        pytest.param(
            dict(retention="best", save_total_limit=1),
            [(100, None), (200, None), (300, None)],
            (),
            {300},
            {300: "newest (resume point); top-1 by eval_loss"},
            id="best-no-metrics-at-all",
        ),
        pytest.param(
            dict(retention="best", save_total_limit=2, metric_for_best_model=ACC, greater_is_better=True),
            [(100, 0.2, 0, ACC), (200, 0.9, 0, ACC), (300, 0.5, 0, ACC), (400, 0.1, 0, ACC)],
            (),
            {200, 300, 400},
            {200: "best eval_mean_token_accuracy=0.9", 100: "not among the 2 best by eval_mean_token_accuracy"},
            id="best-greater-is-better",
        ),
        pytest.param(
            dict(retention="recent", save_total_limit=2),
            [(100, None), (900, None), (1000, None), (200, None)],
            (),
            {900, 1000},
            {1000: "newest (resume point); 2 most recent", 200: "older than the 2 most recent"},
            id="recent-numeric-step-order",
        ),
        pytest.param(
            dict(retention="recent", save_total_limit=None),
            [(100, 1.0), (200, 2.0), (300, 3.0)],
            (),
            {100, 200, 300},
            {200: "no save_total_limit"},
            id="limit-none-keeps-all",
        ),
        pytest.param(
            dict(retention="recent", save_total_limit=1),
            [(100, None), (200, None), (300, None), (400, None)],
            (100, 999),
            {100, 400},
            {100: "in use by a running attempt", 200: "older than the 1 most recent"},
            id="protected-steps-kept-unknown-ignored",
        ),
        pytest.param(
            dict(retention="recent", save_total_limit=1, keep_every_steps=200),
            [(100, None), (200, None), (300, None), (400, None), (500, None)],
            (),
            {200, 400, 500},
            {200: "milestone every 200 steps", 300: "older than the 1 most recent; not a milestone (every 200 steps)"},
            id="milestones",
        ),
        pytest.param(
            dict(retention="best", save_total_limit=1, keep_every_steps=300),
            [(100, 3.0), (200, 1.0), (300, 2.0), (400, 4.0), (600, 5.0), (700, 6.0)],
            (),
            {200, 300, 600, 700},
            {300: "milestone every 300 steps", 400: "not among the 1 best"},
            id="best-with-milestones",
        ),
        pytest.param(
            dict(retention="best", save_total_limit=None),
            [],
            (),
            set(),
            {},
            id="empty",
        ),
    ],
)
def test_decide_retention(settings, rows, protected, kept, reasons):
    _check(settings, rows, protected, kept, reasons)


def _check(settings, rows, protected, kept, reasons):
    checkpoints = ckpts(*rows)
    decision = decide(checkpoints, protected, **settings)
    assert set(decision.keep) == kept
    assert set(decision.keep) | set(decision.prune) == {c.step for c in checkpoints}
    assert not set(decision.keep) & set(decision.prune)
    for step, fragment in reasons.items():
        assert fragment in {**decision.keep, **decision.prune}[step]


# -- byte budget -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "rows", "protected", "kept", "reasons"),
    [
        pytest.param(
            dict(retention="recent", save_total_limit=4, eval_strategy="no", max_total_bytes=2 * MB),
            [(100, None, MB), (200, None, MB), (300, None, MB), (400, None, MB)],
            (),
            {300, 400},
            {100: "over max_total_bytes budget (4.0 MB > 2.0 MB)", 200: "(3.0 MB > 2.0 MB)"},
            id="recent-drops-oldest-first",
        ),
        pytest.param(
            dict(retention="best", save_total_limit=4, max_total_bytes=3 * MB),
            [(100, 1.0, MB), (200, 4.0, MB), (300, 2.0, MB), (400, 3.0, MB), (500, 5.0, MB)],
            (),
            {100, 300, 500},
            {200: "over max_total_bytes budget (5.0 MB > 3.0 MB)", 400: "(4.0 MB > 3.0 MB)", 100: "best eval_loss=1"},
            id="best-drops-worst-metric-first",
        ),
        pytest.param(
            dict(retention="recent", save_total_limit=2, keep_every_steps=100, max_total_bytes=3 * MB,
                 eval_strategy="no"),
            [(100, None, MB), (200, None, MB), (300, None, MB), (400, None, MB), (450, None, MB)],
            (),
            {300, 400, 450},
            {100: "over max_total_bytes", 200: "over max_total_bytes", 300: "milestone"},
            id="milestones-dropped-before-limit-kept-oldest-first",
        ),
        pytest.param(
            dict(retention="best", save_total_limit=3, max_total_bytes=MB // 2),
            [(100, 1.0, MB), (200, 2.0, MB), (300, 3.0, MB)],
            (),
            {100, 300},
            {100: "protected, so kept although over max_total_bytes budget (2.0 MB > 500.0 kB)",
             200: "over max_total_bytes"},
            id="budget-below-one-checkpoint-keeps-only-protected",
        ),
        pytest.param(
            dict(retention="recent", save_total_limit=3, max_total_bytes=1, eval_strategy="no"),
            [(100, None, MB), (200, None, MB), (300, None, MB)],
            (200,),
            {200, 300},
            {200: "in use by a running attempt", 300: "protected, so kept although over", 100: "over max_total_bytes"},
            id="budget-never-drops-protected-steps",
        ),
        pytest.param(
            dict(retention="recent", save_total_limit=3, max_total_bytes=10 * MB),
            [(100, None, MB), (200, None, MB)],
            (),
            {100, 200},
            {100: "3 most recent"},
            id="under-budget-no-change",
        ),
    ],
)
def test_byte_budget(settings, rows, protected, kept, reasons):
    _check(settings, rows, protected, kept, reasons)


def test_byte_budget_trim_reports_running_total():
    dropped, total = ByteBudget(2 * MB).trim(ckpts((1, None, MB), (2, None, MB)), 3 * MB)
    assert dropped == {1: "over max_total_bytes budget (3.0 MB > 2.0 MB)"}
    assert total == 2 * MB


# -- composition by hand ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "kept"),
    [
        (RetentionPolicy(keep=(KeepNewest(2),)), {500, 400}),
        (RetentionPolicy(keep=(KeepBest(2, "eval_loss", False),)), {200, 300}),
        (RetentionPolicy(keep=(KeepMilestones(200),)), {200, 400}),
        (RetentionPolicy(protect=(ProtectNewest(),)), {500}),
        (RetentionPolicy(protect=(ProtectBest("eval_loss", False),)), {200}),
        (RetentionPolicy(protect=(ProtectSteps(frozenset({100})),)), {100}),
        (RetentionPolicy(keep=(KeepNewest(1), KeepBest(1, "eval_loss", True))), {500, 100}),
        (RetentionPolicy(keep=(KeepNewest(None),), budget=ByteBudget(2)), {400, 500}),
        (RetentionPolicy(protect=(ProtectNewest(),), keep=(KeepBest(None, "eval_loss", False),), budget=ByteBudget(2)),
         {200, 500}),
    ],
)
def test_compose_policies(policy, kept):
    checkpoints = ckpts((100, 9.0, 1), (200, 1.0, 1), (300, 2.0, 1), (400, 3.0, 1), (500, 4.0, 1))
    assert set(decide_retention(policy, checkpoints).keep) == kept


def test_duplicate_steps_refused():
    with pytest.raises(ValueError, match="duplicate checkpoint steps \\[2\\]"):
        decide(ckpts((2, 1.0), (2, 2.0)))


def test_decision_lists_steps_in_numeric_order():
    decision = decide(ckpts((1000, None), (200, None), (30, None)), retention="recent", save_total_limit=None)
    assert list(decision.keep) == decision.kept_steps == [30, 200, 1000]


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (999, "999 B"), (1_200_000, "1.2 MB"), (3 * 10**9, "3.0 GB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


# -- property: random histories --------------------------------------------------------


def _random_case(rng: random.Random):
    steps = rng.sample(range(1, 400), rng.randint(0, 14))
    metric = rng.choice(["eval_loss", "eval_mean_token_accuracy"])
    checkpoints = []
    for s in steps:
        roll = rng.random()
        value = None if roll < 0.1 else NAN if roll < 0.15 else INF if roll < 0.18 else round(rng.uniform(0, 3), 1)
        checkpoints.append(Ckpt(s, {} if value is None else {metric: value}, rng.choice([1, 10, 100])))
    settings = CheckpointSettings(
        retention=rng.choice(["best", "recent"]),
        save_total_limit=rng.choice([None, 1, 2, 3, 5]),
        metric_for_best_model=metric,
        greater_is_better=metric == "eval_mean_token_accuracy",
        keep_every_steps=rng.choice([None, None, 10, 50]),
        max_total_bytes=rng.choice([None, None, 5, 50, 300]),
    )
    protected = set(rng.sample(steps, min(len(steps), rng.randint(0, 2))))
    return settings, checkpoints, protected


@pytest.mark.parametrize("seed", range(300))
def test_retention_properties(seed):
    settings, checkpoints, protected = _random_case(random.Random(seed))
    policy = retention_policy(settings)
    decision = decide_retention(policy, checkpoints, protected)
    steps = {c.step for c in checkpoints}
    kept = set(decision.keep)
    # 1. every checkpoint in exactly one set, each with a reason
    assert kept | set(decision.prune) == steps and not kept & set(decision.prune)
    assert all(decision.keep.values()) and all(decision.prune.values())
    # 2. newest, best and protected always kept
    if checkpoints:
        assert max(steps) in kept
    best = best_step(checkpoints, settings.metric_key, settings.greater_is_better)
    assert best is None or best in kept
    assert protected <= kept
    # 3. kept count bounded by limit + protected (+ milestones)
    if settings.save_total_limit is not None:
        milestones = {s for s in steps if settings.keep_every_steps and s % settings.keep_every_steps == 0}
        guarded = {max(steps, default=None), best, *protected} - {None}
        assert len(kept) <= settings.save_total_limit + len(guarded) + len(milestones)
    # 4. the budget holds unless only guarded checkpoints remain
    if settings.max_total_bytes is not None:
        total = sum(c.bytes for c in checkpoints if c.step in kept)
        guarded = {max(steps, default=None), best, *protected} - {None}
        assert total <= settings.max_total_bytes or kept <= guarded
    # 5. idempotent: deciding again over the kept set prunes nothing
    again = decide_retention(policy, [c for c in checkpoints if c.step in kept], protected)
    assert again.prune == {}


# -- save policies ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "steps_per_epoch", "total", "expected"),
    [
        (dict(save_strategy="steps", save_steps=2), 2, 4, [2, 4]),
        (dict(save_strategy="steps", save_steps=3), 5, 10, [3, 6, 9, 10]),
        (dict(save_strategy="epoch", eval_strategy="epoch"), 4, 10, [4, 8, 10]),
        (dict(save_strategy="epoch", eval_strategy="epoch"), 5, 10, [5, 10]),
        (dict(save_strategy="steps", save_steps=100), 7, 5, [5]),
    ],
)
def test_save_policy(settings, steps_per_epoch, total, expected):
    policy = save_policy(CheckpointSettings(**settings), steps_per_epoch)
    assert [s for s in range(1, total + 1) if policy.should_save(s, total)] == expected


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (EveryNSteps(4), [4, 8]),
        (FinalStep(), [10]),
        (AtSteps(frozenset({3, 7})), [3, 7]),
        (AnySave((EveryNSteps(4), AtSteps(frozenset({5})), FinalStep())), [4, 5, 8, 10]),
        (AnySave(()), []),
    ],
)
def test_save_policies_compose(policy, expected):
    assert [s for s in range(0, 11) if policy.should_save(s, 10)] == expected


def test_save_policy_refuses_non_positive_epoch():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        save_policy(CheckpointSettings(), 0)
