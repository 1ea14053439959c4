"""Read-only views of the ledger for the CLI's `runs` and `checkpoints` (plain JSON-able rows)."""

from __future__ import annotations

from typing import Any

from ckptflow.ledger import CheckpointRecord, CheckpointState, Ledger
from ckptflow.policy import best_step
from ckptflow.runs import get_run, run_settings


def _checkpoint_row(c: CheckpointRecord, metric: str, best: int | None) -> dict[str, Any]:
    return {
        "step": c.step,
        "state": str(c.state),
        "metric": c.metrics.get(metric),
        "metrics": c.metrics,
        "bytes": c.bytes,
        "is_best": c.step == best,
        "reason": c.reason,
        "path": c.path,
        "created_at": c.created_at.isoformat() if c.created_at else None,
    }


def checkpoints_view(ledger: Ledger, run_name: str, *, include_all: bool = False) -> list[dict[str, Any]]:
    """Committed checkpoints (or every recorded one) ordered by step, with is_best."""
    run = get_run(ledger, run_name)
    ck = run_settings(run).checkpoint
    rows = ledger.checkpoints(run.id, states=None if include_all else [CheckpointState.COMMITTED])
    committed = [c for c in rows if c.state == CheckpointState.COMMITTED]
    best = best_step(committed, ck.metric_key, ck.greater_is_better) if ck.evaluates else None
    return [_checkpoint_row(c, ck.metric_key, best) for c in rows]


def runs_view(ledger: Ledger) -> list[dict[str, Any]]:
    """Every run, newest first: status, steps done, best step and metric."""
    out = []
    for run in ledger.list_runs():
        ck = run_settings(run).checkpoint
        committed = ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED])
        best = best_step(committed, ck.metric_key, ck.greater_is_better) if ck.evaluates else None
        best_row = next((c for c in committed if c.step == best), None)
        out.append(
            {
                "name": run.name,
                "status": str(run.status),
                "total_steps": run.total_steps,
                "last_step": max((c.step for c in committed), default=0),
                "best_step": best,
                "metric": ck.metric_key,
                "best_metric": best_row.metrics.get(ck.metric_key) if best_row else None,
                "base_model": run.base_model,
                "created_at": run.created_at.isoformat() if run.created_at else None,
                "updated_at": run.updated_at.isoformat() if run.updated_at else None,
            }
        )
    return out
