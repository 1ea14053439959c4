"""What a run looks like to a person: checkpoint table rows, a markdown summary, a loss-curve PNG.

Plain data and files only; tasks/reporting.py publishes them as Prefect artifacts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ckptflow.ledger import CheckpointRecord, CheckpointState, Ledger
from ckptflow.runs import get_run, run_settings
from ckptflow.selection import rank_checkpoints

# HF writes the training log into every checkpoint under this name.
TRAINER_STATE = "trainer_state.json"
LOSS_CURVE_PNG = "loss-curve.png"


def artifact_key(run_name: str, kind: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only; stable per run."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-") or "run"
    return f"{slug}-{kind}"


def checkpoint_rows(ledger: Ledger, run_name: str) -> list[dict[str, Any]]:
    """One row per checkpoint ever recorded: step, state, metric, size, kept/pruned and why, is_best."""
    run = get_run(ledger, run_name)
    settings = run_settings(run)
    rows = ledger.checkpoints(run.id)
    committed = [c for c in rows if c.state == CheckpointState.COMMITTED]
    ranked = rank_checkpoints(committed, settings) if committed else []
    best_step = ranked[0].step if ranked and settings.checkpoint.evaluates else None
    key = settings.checkpoint.metric_key
    return [
        {
            "step": c.step,
            "state": str(c.state),
            key: c.metrics.get(key),
            "loss": c.metrics.get("loss"),
            "bytes": c.bytes,
            "is_best": c.step == best_step,
            "reason": c.reason or "",
            "path": c.path,
        }
        for c in rows
    ]


def training_log(ledger: Ledger, run_name: str) -> list[dict[str, Any]]:
    """HF's log_history from the newest checkpoint still on disk (it carries the whole run's history)."""
    run = get_run(ledger, run_name)
    for ckpt in sorted(ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED]), key=lambda c: -c.step):
        state_file = Path(ckpt.path) / TRAINER_STATE
        if state_file.is_file():
            return json.loads(state_file.read_text()).get("log_history", [])
    return []


def loss_curve_png(log_history: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """Train and eval loss by step as a PNG; None when there is nothing to plot."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", marker=".")
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_markdown(ledger: Ledger, run_name: str, loss_curve: Path | None = None) -> str:
    """Markdown summary: status, best step, base vs best metrics, export, chunks with retries and resume points."""
    run = get_run(ledger, run_name)
    m = run.metrics
    exports = ledger.exports(run.id)
    lines = [
        f"# Run `{run.name}`",
        "",
        f"- status: **{run.status}**; steps: {run.total_steps}; base model: `{run.base_model}`",
        f"- best step: {m.get('best_step', '—')}",
        f"- eval loss base → best: {_fmt(m.get('base_eval_loss', '—'))} → {_fmt(m.get('best_eval_loss', '—'))}",
        f"- perplexity base → best: {_fmt(m.get('base_perplexity', '—'))} → {_fmt(m.get('best_perplexity', '—'))}",
        f"- export: `{exports[-1].path}` (step {exports[-1].step})" if exports else "- export: none yet",
        "",
        "## Attempts",
        "",
        "| chunk | attempt | steps | resumed from | status | seconds | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for a in ledger.attempts(run.id):
        seconds = (a.finished_at - a.started_at).total_seconds() if a.finished_at else None
        note = " ".join(filter(None, [a.error, a.notes])).replace("|", "/").replace("\n", " ")[:200]
        resumed = f"checkpoint-{a.resumed_from_step}" if a.resumed_from_step is not None else "scratch"
        lines.append(
            f"| {a.chunk} | {a.attempt} | {a.start_step}-{a.end_step} | {resumed} | {a.status} | "
            f"{_fmt(seconds) if seconds is not None else '—'} | {note} |"
        )
    if loss_curve is not None:
        lines += ["", f"Loss curve: `{loss_curve}`"]
    return "\n".join(lines)
