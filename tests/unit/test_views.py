"""`runs_view` / `checkpoints_view`: the same answers as the policy functions, in a constant number of queries."""

from __future__ import annotations

import math

import pytest
from ckptflow.ledger import CheckpointState, Ledger
from ckptflow.policy import best_step
from ckptflow.runs import CONFIG_SETTINGS
from ckptflow.settings import load_settings
from ckptflow.views import checkpoints_view, runs_view
from sqlalchemy import event


@pytest.fixture
def ledger(home, tmp_path):
    led = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    yield led
    led.close()


def _run(ledger: Ledger, name: str, **checkpoint: object):
    settings = load_settings(checkpoint=checkpoint) if checkpoint else load_settings()
    return ledger.create_run(
        name, fingerprint=name, config={CONFIG_SETTINGS: settings.to_json()}, base_model="m", total_steps=10
    )


def _commit(ledger: Ledger, run, step: int, **metrics: float) -> None:
    ledger.commit_checkpoint(
        run.id, step, epoch=None, metrics=metrics, bytes=1, manifest_sha256="s", path=f"/{run.name}/checkpoint-{step}"
    )


def _expected(ledger: Ledger, run, metric: str, greater: bool, evaluates: bool) -> tuple:
    committed = ledger.checkpoints(run.id, [CheckpointState.COMMITTED])
    best = best_step(committed, metric, greater) if evaluates else None
    value = next((c.metrics[metric] for c in committed if c.step == best), None)
    return max((c.step for c in committed), default=0), best, value


def test_runs_view_agrees_with_the_policy_for_every_kind_of_run(ledger):
    lower = _run(ledger, "lower")
    for step, loss in ((2, 3.0), (4, 1.0), (6, 1.0), (8, 2.0)):  # tie at 1.0: the earlier step wins
        _commit(ledger, lower, step, eval_loss=loss)
    ledger.mark_checkpoint(lower.id, 8, CheckpointState.PRUNED)
    higher = _run(ledger, "higher", metric_for_best_model="eval_mean_token_accuracy", greater_is_better=True)
    for step, acc in ((2, 0.1), (4, 0.4), (6, 0.3)):
        _commit(ledger, higher, step, eval_mean_token_accuracy=acc, eval_loss=1.0)
    diverged = _run(ledger, "diverged")  # NaN metrics must neither win nor break the query
    _commit(ledger, diverged, 2, eval_loss=2.0, loss=float("nan"))
    _commit(ledger, diverged, 4, eval_loss=float("nan"))
    no_eval = _run(ledger, "no-eval", eval_strategy="no", retention="recent")
    _commit(ledger, no_eval, 2)
    empty = _run(ledger, "empty")

    rows = {r["name"]: r for r in runs_view(ledger)}
    cases = [
        (lower, "eval_loss", False, True),
        (higher, "eval_mean_token_accuracy", True, True),
        (diverged, "eval_loss", False, True),
        (no_eval, "eval_loss", False, False),
        (empty, "eval_loss", False, True),
    ]
    for run, metric, greater, evaluates in cases:
        row = rows[run.name]
        assert (row["last_step"], row["best_step"], row["best_metric"]) == _expected(ledger, run, metric, greater, evaluates)
        assert row["metric"] == metric
    assert (rows["lower"]["best_step"], rows["higher"]["best_step"], rows["diverged"]["best_step"]) == (4, 4, 2)
    assert [r["name"] for r in runs_view(ledger)] == ["empty", "no-eval", "diverged", "higher", "lower"]


def test_runs_view_query_count_does_not_grow_with_runs(ledger):
    for i in range(30):
        run = _run(ledger, f"r{i}")
        _commit(ledger, run, 2, eval_loss=1.0 / (i + 1))
    statements: list[str] = []
    event.listen(ledger._engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    rows = runs_view(ledger)
    assert len(rows) == 30 and all(r["best_step"] == 2 for r in rows)
    assert len([s for s in statements if s.lstrip().upper().startswith("SELECT")]) <= 4


def test_checkpoints_view_marks_the_best(ledger):
    run = _run(ledger, "run")
    for step, loss in ((2, 3.0), (4, 1.0), (6, math.inf)):
        _commit(ledger, run, step, eval_loss=loss)
    rows = checkpoints_view(ledger, "run")
    assert [(r["step"], r["is_best"]) for r in rows] == [(2, False), (4, True), (6, False)]


@pytest.mark.parametrize(
    ("settings", "metrics", "best"),
    [
        # (run settings, {step: metrics}, the best step everyone must agree on)
        ({}, {2: 3.0, 4: 1.0, 6: 1.0, 8: 2.0}, 4),  # tie: the earlier step
        ({}, {2: 2.0, 4: float("nan"), 6: float("-inf")}, 2),  # non-finite never best
        ({"metric_for_best_model": "eval_mean_token_accuracy", "greater_is_better": True}, {2: 0.1, 4: 0.4, 6: 0.3}, 4),
        ({"eval_strategy": "no", "retention": "recent"}, {2: None, 4: None}, None),  # export then takes the newest
    ],
)
def test_one_ranking_for_runs_checkpoints_retention_and_export(ledger, settings, metrics, best):
    """`runs`, `checkpoints`, retention's protected best and export's choice are one ranking (policy.rank_best)."""
    from ckptflow.integrity import write_manifest
    from ckptflow.policy import decide_retention, retention_policy
    from ckptflow.selection import choose_checkpoint

    run = _run(ledger, "run", **settings)
    full = load_settings(checkpoint=settings)
    for step, value in metrics.items():
        path = full.checkpoints_dir(run.name) / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_bytes(b"w" * step)
        recorded = {} if value is None else {full.checkpoint.metric_key: value}
        _, sha = write_manifest(path, step=step, metrics=recorded, settings_digest="d")
        ledger.commit_checkpoint(
            run.id, step, epoch=None, metrics=recorded, bytes=step, manifest_sha256=sha, path=str(path)
        )
    committed = ledger.checkpoints(run.id, [CheckpointState.COMMITTED])
    [row] = runs_view(ledger)
    marked = [r["step"] for r in checkpoints_view(ledger, "run") if r["is_best"]]
    protected = decide_retention(retention_policy(full.checkpoint), committed).keep
    exported, _ = choose_checkpoint(ledger, run, full)
    assert row["best_step"] == best and marked == ([best] if best else [])
    assert exported.step == (best or max(metrics))
    if best:
        assert f"best {full.checkpoint.metric_key}" in protected[best]
