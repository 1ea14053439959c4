"""Read-only views of the ledger for the CLI's `runs` and `checkpoints` (plain JSON-able rows)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ckptflow.ledger import CheckpointRecord, CheckpointState, Ledger, RunRecord
from ckptflow.policy import best_step
from ckptflow.runs import CONFIG_SETTINGS, get_run
from ckptflow.settings import CheckpointSettings

# (metric, greater_is_better) summarised when no run evaluates: only its counts are used.
_NO_METRIC = ("eval_loss", False)


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
        "location": checkpoint_location(c),
        "created_at": c.created_at.isoformat() if c.created_at else None,
    }


def checkpoint_location(c: CheckpointRecord) -> str | None:
    """Where the checkpoint lives: `local`, `remote` (a verified copy on checkpoint.remote_url), `both`, or None."""
    local, remote = Path(c.path).is_dir(), c.remote_at is not None
    return "both" if local and remote else "local" if local else "remote" if remote else None


def checkpoints_view(ledger: Ledger, run_name: str, *, include_all: bool = False) -> list[dict[str, Any]]:
    """Committed checkpoints (or every recorded one) ordered by step, with is_best."""
    run = get_run(ledger, run_name)
    ck = _checkpoint_settings(run, {})
    rows = ledger.checkpoints(run.id, states=None if include_all else [CheckpointState.COMMITTED])
    committed = [c for c in rows if c.state == CheckpointState.COMMITTED]
    best = best_step(committed, ck.metric_key, ck.greater_is_better) if ck.evaluates else None
    return [_checkpoint_row(c, ck.metric_key, best) for c in rows]


def runs_view(ledger: Ledger) -> list[dict[str, Any]]:
    """Every run, newest first: status, steps done, best step and metric.

    A constant number of queries however many runs there are: the run list, then
    `Ledger.best_metrics` (two queries) once per distinct (metric, direction) among the runs
    — usually one. Only the checkpoint group of each run's recorded settings is parsed.
    """
    runs = ledger.list_runs()
    cache: dict[str, CheckpointSettings] = {}
    policies = {run.id: _checkpoint_settings(run, cache) for run in runs}
    keys = {(ck.metric_key, ck.greater_is_better) for ck in policies.values() if ck.evaluates} or {_NO_METRIC}
    summaries = {key: ledger.best_metrics(key[0], greater_is_better=key[1]) for key in keys}
    any_summary = next(iter(summaries.values()))
    out = []
    for run in runs:
        ck = policies[run.id]
        counts = any_summary.get(run.id, {})
        best = summaries[(ck.metric_key, ck.greater_is_better)].get(run.id, {}) if ck.evaluates else {}
        out.append(
            {
                "name": run.name,
                "status": str(run.status),
                "total_steps": run.total_steps,
                "last_step": counts.get("latest_step") or 0,
                "best_step": best.get("best_step"),
                "metric": ck.metric_key,
                "best_metric": best.get("best_value"),
                "base_model": run.base_model,
                "created_at": run.created_at.isoformat() if run.created_at else None,
                "updated_at": run.updated_at.isoformat() if run.updated_at else None,
            }
        )
    return out


def _checkpoint_settings(run: RunRecord, cache: dict[str, CheckpointSettings]) -> CheckpointSettings:
    """The checkpoint group of the run's recorded settings (parsed once per distinct group in `cache`).

    Cheaper than `runs.run_settings`, which validates every group and reads the environment.
    """
    group = run.config[CONFIG_SETTINGS]["checkpoint"]
    key = json.dumps(group, sort_keys=True)
    if key not in cache:
        cache[key] = CheckpointSettings.model_validate(group)
    return cache[key]
