"""What a run looks like to a person: checkpoint table rows, a markdown summary, a loss-curve SVG,
and the explanation of a retrain decision.

Plain data and files only; tasks/reporting.py publishes them as Prefect artifacts.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from ckptflow.ledger import AttemptRecord, CheckpointState, Ledger
from ckptflow.loss_curve import render_loss_curve
from ckptflow.policy import best_step, decide_retention, format_bytes, retention_policy
from ckptflow.views import checkpoint_location
from ckptflow.runs import CONFIG_DATA_FINGERPRINT, get_run, run_settings

# HF writes the training log into every checkpoint under this name.
TRAINER_STATE = "trainer_state.json"
LOSS_CURVE_SVG = "loss-curve.svg"
# Prefect UI routes (relative, so links work on whatever host serves the UI).
UI_TASK_RUN = "/runs/task-run/{id}"
UI_FLOW_RUN = "/runs/flow-run/{id}"
# What happened to a checkpoint, by ledger state (committed ones are "kept").
_FATE = {
    CheckpointState.COMMITTED: "kept",
    CheckpointState.PRUNED: "pruned",
    CheckpointState.CORRUPT: "quarantined",
    CheckpointState.PARTIAL: "quarantined",
    CheckpointState.WRITING: "being written",
}


def artifact_key(run_name: str, kind: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only; stable per run."""
    slug = re.sub(r"[^a-z0-9]+", "-", run_name.lower()).strip("-") or "run"
    return f"{slug}-{kind}"


def checkpoint_rows(ledger: Ledger, run_name: str) -> list[dict[str, Any]]:
    """One row per checkpoint ever recorded: step, state, metric, size, kept/pruned and why, is_best.

    For committed checkpoints `why` is the retention policy's reason to keep them; for the
    others it is the reason the ledger recorded when they were pruned or quarantined.
    """
    run = get_run(ledger, run_name)
    ck = run_settings(run).checkpoint
    rows = ledger.checkpoints(run.id)
    committed = [c for c in rows if c.state == CheckpointState.COMMITTED]
    decision = decide_retention(retention_policy(ck), committed) if committed else None
    best = best_step(committed, ck.metric_key, ck.greater_is_better) if ck.evaluates and committed else None
    out = []
    for c in rows:
        fate, why = _FATE.get(c.state, str(c.state)), c.reason or ""
        if decision is not None and c.state == CheckpointState.COMMITTED:
            why = decision.keep.get(c.step) or f"pending retention: {decision.prune.get(c.step, '')}"
        out.append(
            {
                "step": c.step,
                "state": str(c.state),
                ck.metric_key: _rounded(c.metrics.get(ck.metric_key)),
                "loss": _rounded(c.metrics.get("loss")),
                "size": format_bytes(c.bytes) if c.bytes else "",
                "bytes": c.bytes,
                "is_best": c.step == best,
                "kept": fate,
                "why": why,
                "location": checkpoint_location(c) or "—",
                "path": c.path,
            }
        )
    return out


def _rounded(value: Any) -> Any:
    """A metric as people read it (6 significant digits); the ledger and --json keep full precision."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


def training_log(ledger: Ledger, run_name: str) -> list[dict[str, Any]]:
    """HF's log_history from the newest checkpoint still on disk (it carries the whole run's history)."""
    run = get_run(ledger, run_name)
    for ckpt in sorted(ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED]), key=lambda c: -c.step):
        state_file = Path(ckpt.path) / TRAINER_STATE
        if state_file.is_file():
            return json.loads(state_file.read_text()).get("log_history", [])
    return []


def loss_curve_svg(log_history: list[dict[str, Any]], out: Path, title: str) -> Path | None:
    """Train and eval loss by step written as an SVG to `out`; None (and no file) when there is nothing to plot."""
    svg = render_loss_curve(log_history, title)
    if svg is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(svg, encoding="utf-8")
    return out


def svg_data_uri(path: Path) -> str:
    """The SVG inlined as a `data:` URI: renders in the Prefect UI's markdown offline, no file server needed."""
    return "data:image/svg+xml;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "—" if value is None else str(value)


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


def _seconds(a: AttemptRecord) -> float | None:
    return (a.finished_at - a.started_at).total_seconds() if a.finished_at else None


def _task_link(a: AttemptRecord) -> str:
    return f"[task run]({UI_TASK_RUN.format(id=a.prefect_task_run_id)})" if a.prefect_task_run_id else "—"


def _chunk_lines(attempts: list[AttemptRecord]) -> list[str]:
    """Per chunk: steps, attempts, retries, total time, where the last attempt resumed from."""
    lines = [
        "| chunk | steps | attempts | retries | seconds | resumed from | status |",
        "|---|---|---|---|---|---|---|",
    ]
    for chunk in sorted({a.chunk for a in attempts}):
        mine = [a for a in attempts if a.chunk == chunk]
        last = mine[-1]
        seconds = sum(s for s in (_seconds(a) for a in mine) if s is not None)
        resumed = f"checkpoint-{last.resumed_from_step}" if last.resumed_from_step is not None else "scratch"
        lines.append(
            f"| {chunk} | {last.start_step}-{last.end_step} | {len(mine)} | {len(mine) - 1} | {seconds:.1f} | "
            f"{resumed} | {last.status} |"
        )
    return lines


def _attempt_lines(attempts: list[AttemptRecord]) -> list[str]:
    lines = [
        "| chunk | attempt | steps | resumed from | status | seconds | Prefect | notes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in attempts:
        note = _cell(" ".join(filter(None, [a.error, a.notes])))[:200]
        resumed = f"checkpoint-{a.resumed_from_step}" if a.resumed_from_step is not None else "scratch"
        lines.append(
            f"| {a.chunk} | {a.attempt} | {a.start_step}-{a.end_step} | {resumed} | {a.status} | "
            f"{_fmt(_seconds(a))} | {_task_link(a)} | {note} |"
        )
    return lines


def summary_markdown(ledger: Ledger, run_name: str, loss_curve: Path | None = None, *, embed: bool = True) -> str:
    """Markdown summary: status, best step, base vs best metrics, export path, time per chunk,
    retries and what they resumed from, and the loss curve (inlined as an image when `embed`)."""
    run = get_run(ledger, run_name)
    m = run.metrics
    exports = ledger.exports(run.id)
    attempts = ledger.attempts(run.id)
    retries = sum(1 for a in attempts if a.attempt > 1)
    lines = [
        f"# Run `{run.name}`",
        "",
        f"- status: **{run.status}**; steps: {run.total_steps}; base model: `{run.base_model}`; "
        f"precision: {_precision(run)}",
        f"- best step: {m.get('best_step', '—')}",
        f"- export: `{exports[-1].path}` (step {exports[-1].step})" if exports else "- export: none yet",
        f"- retries: {retries} (each resumed from the newest verified checkpoint)",
        f"- data fingerprint: `{str(run.config.get(CONFIG_DATA_FINGERPRINT, ''))[:16]}`",
        "",
        "## Base vs best",
        "",
        "| metric | base | best |",
        "|---|---|---|",
        f"| eval loss | {_fmt(m.get('base_eval_loss'))} | {_fmt(m.get('best_eval_loss'))} |",
        f"| perplexity | {_fmt(m.get('base_perplexity'))} | {_fmt(m.get('best_perplexity'))} |",
        "",
        "## Chunks",
        "",
        *_chunk_lines(attempts),
        "",
        "## Attempts",
        "",
        *_attempt_lines(attempts),
    ]
    if loss_curve is not None and loss_curve.is_file():
        lines += ["", "## Loss curve", ""]
        if embed:
            lines += [f"![loss curve of {run.name}]({svg_data_uri(loss_curve)})", ""]
        lines.append(f"SVG: `{loss_curve}`")
    return "\n".join(lines)


def _precision(run) -> str:
    """The precision the run recorded (resolved when it opened, so never `auto`)."""
    return run_settings(run).train.precision


def decision_markdown(record: dict[str, Any]) -> str:
    """Explain a retrain decision (promotion.DecisionRecord.to_json()): what was compared, on what, and why."""
    champion, challenger = record.get("champion") or {}, record.get("challenger") or {}
    lines = [
        f"# Retrain: **{record['action']}**",
        "",
        f"{record['reason']}",
        "",
        f"- data fingerprint: `{str(record.get('data_fingerprint', ''))[:16]}`",
        f"- champion before: `{champion.get('run', 'none')}`",
        f"- challenger: `{challenger.get('run', '—')}`",
        f"- promotion margin: {record.get('margin')} ({record.get('metric')}, lower is better)",
        f"- decided at: {record.get('decided_at')}",
    ]
    if record.get("scores"):
        lines += [
            "",
            f"Both evaluated on the challenger's eval set ({record.get('eval_rows')} rows):",
            "",
            "| model | run | export | eval loss | perplexity |",
            "|---|---|---|---|---|",
        ]
        for role in ("champion", "challenger"):
            score, who = record["scores"].get(role), record.get(role) or {}
            if score:
                lines.append(
                    f"| {role} | `{who.get('run')}` | `{who.get('path')}` | {_fmt(score.get('eval_loss'))} | "
                    f"{_fmt(score.get('perplexity'))} |"
                )
    if record.get("pointer"):
        lines += ["", f"Champion pointer: `{record['pointer']}`"]
    return "\n".join(lines)
