"""Champion/challenger for scheduled retraining: skip, compare, promote, record.

The champion is the export marked `promoted` in the ledger (exactly one: promotion flips
the flags in one transaction). `$CKPTFLOW_HOME/exports/champion.json` points at it for whoever serves the
model, the symlink `exports/champion` makes it loadable by path, and every decision
(promote, keep, skip) is appended to `exports/decisions.jsonl`.

Deciding is pure (`decide_skip`, `decide_promotion`); `record_decision` acts.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ckptflow.errors import BadInputError
from ckptflow.evaluation import EVAL_LOSS
from ckptflow.export import LOCAL_MODEL_PREFIX, PROVENANCE_NAME
from ckptflow.ledger import ExportRecord, Ledger
from ckptflow.runs import CONFIG_DATA_FINGERPRINT
from ckptflow.settings import Settings

__all__ = [
    "CHAMPION_FILE",
    "CHAMPION_LINK",
    "DECISIONS_FILE",
    "PROMOTION_METRIC",
    "SKIPPED_NO_NEW_DATA",
    "Champion",
    "Decision",
    "DecisionRecord",
    "challenger_name",
    "comparable",
    "current_champion",
    "decide_promotion",
    "decide_skip",
    "evaluate_exports",
    "judge",
    "read_pointer",
    "record_decision",
    "rollback",
    "rollback_target",
    "skip_record",
]

# Lower is better; the same number training's evaluation reports.
PROMOTION_METRIC = EVAL_LOSS
# Under $CKPTFLOW_HOME/exports/: the pointer to the champion, a symlink to its directory, the decision log.
CHAMPION_FILE = "champion.json"
CHAMPION_LINK = "champion"
DECISIONS_FILE = "decisions.jsonl"
# The reason (and Prefect state message) of a retrain that found nothing new to train on.
SKIPPED_NO_NEW_DATA = "skipped: no new data"

Action = Literal["promote", "keep", "skip", "rollback"]

log = logging.getLogger(__name__)


class NothingToRollBackError(BadInputError):
    """`rollback` found no earlier champion that is still kept."""


@dataclass(frozen=True)
class Champion:
    """The current champion: a promoted export and the run that made it."""

    run: str
    export_id: int
    path: str
    step: int
    base_model: str
    data_fingerprint: str | None
    metrics: dict[str, Any]


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


@dataclass(frozen=True)
class DecisionRecord:
    """A decision with everything that led to it; what `decisions.jsonl` and the artifact show."""

    action: Action
    reason: str
    data_fingerprint: str
    margin: float
    metric: str = PROMOTION_METRIC
    champion: dict[str, Any] | None = None
    challenger: dict[str, Any] | None = None
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    eval_rows: int | None = None
    pointer: str | None = None
    decided_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def skip_record(decision: Decision, champion: Champion | None, data_fingerprint: str, margin: float) -> DecisionRecord:
    """The record of a retrain that trained nothing."""
    return DecisionRecord(
        action=decision.action,
        reason=decision.reason,
        data_fingerprint=data_fingerprint,
        margin=margin,
        champion=asdict(champion) if champion else None,
    )


def challenger_name(now: datetime, prefix: str = "retrain") -> str:
    """`retrain-20250101-020000` (UTC): sorts by time, valid as a run name and an artifact key."""
    return f"{prefix}-{now.astimezone(UTC):%Y%m%d-%H%M%S}"


# -- deciding (pure) -------------------------------------------------------------------------


def decide_skip(data_fingerprint: str, champion: Champion | None, *, force: bool = False) -> Decision | None:
    """A skip decision when the champion was trained on exactly this data (and not `force`d), else None."""
    if force or champion is None or champion.data_fingerprint != data_fingerprint:
        return None
    return Decision("skip", f"{SKIPPED_NO_NEW_DATA}: champion `{champion.run}` was trained on this data")


def decide_promotion(challenger_loss: float | None, champion_loss: float | None, margin: float) -> Decision:
    """Promote when there is no comparable champion, or when the challenger's loss is lower by at least `margin`.

    "Better" is strict: with margin 0 a tie keeps the champion. A challenger without a finite
    loss is never promoted over a champion.
    """
    if champion_loss is None:
        return Decision("promote", "no champion to compare with: the challenger becomes the first champion")
    if challenger_loss is None or not math.isfinite(challenger_loss):
        return Decision("keep", f"the challenger has no finite {PROMOTION_METRIC}: champion kept")
    improvement = champion_loss - challenger_loss
    summary = (
        f"{PROMOTION_METRIC} {champion_loss:.4f} → {challenger_loss:.4f} "
        f"(improvement {improvement:+.4f}, margin {margin})"
    )
    if improvement > 0 and improvement >= margin:
        return Decision("promote", f"challenger is better by at least the margin: {summary}")
    return Decision("keep", f"challenger is not better by the margin: {summary}; champion kept")


# -- reading the champion ------------------------------------------------------------------------


def current_champion(ledger: Ledger) -> Champion | None:
    """The newest promoted export, or None before the first promotion."""
    promoted = [e for e in ledger.exports() if e.promoted]
    if not promoted:
        return None
    export = promoted[-1]
    run = ledger.get_run_by_id(export.run_id)
    return Champion(
        run=run.name,
        export_id=export.id,
        path=export.path,
        step=export.step,
        base_model=run.base_model,
        data_fingerprint=run.config.get(CONFIG_DATA_FINGERPRINT),
        metrics=export.metrics,
    )


def read_pointer(home: Path) -> dict[str, Any] | None:
    """The contents of `exports/champion.json`, or None when nothing was promoted yet."""
    path = home / "exports" / CHAMPION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


# -- comparing -------------------------------------------------------------------------------------


def _load_export(path: Path, settings: Settings) -> Any:
    """A model from an export directory: merged weights directly, an adapter on its base model.

    An export names a local base model only as `local:<name>` (it says nothing about the machine
    it was trained on); the adapter is then loaded onto this run's base model."""
    provenance = json.loads((path / PROVENANCE_NAME).read_text())
    if provenance.get("merged", True):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    from peft import PeftModel

    from ckptflow.modeling import load_base_model, resolve_model

    base = provenance["base_model"]
    if base.startswith(LOCAL_MODEL_PREFIX):
        base = settings.model.name_or_path
    return PeftModel.from_pretrained(load_base_model(resolve_model(base, settings.home)), str(path))


def evaluate_exports(settings: Settings, exports: dict[str, Path]) -> tuple[dict[str, dict[str, float]], int]:
    """Eval loss and perplexity of each export on the eval set of `settings` (the challenger's).

    Returns ({name: {"eval_loss", "perplexity"}}, eval rows); ({}, 0) when there is no eval data.
    Same eval set, same tokenization, same batch size for every model: the numbers compare.
    """
    from ckptflow.evaluation import evaluate_model
    from ckptflow.pipeline import load_inputs

    _, tokenizer, data = load_inputs(settings)
    if data.eval is None:
        return {}, 0
    scores = {
        name: evaluate_model(_load_export(path, settings), data.eval, tokenizer, settings)
        for name, path in exports.items()
    }
    return scores, data.eval_rows


def comparable(champion: Champion, challenger_base_model: str) -> str | None:
    """Why the champion cannot be evaluated on the challenger's token ids, or None if it can."""
    if not (Path(champion.path) / PROVENANCE_NAME).is_file():
        return f"champion export {champion.path} is missing on disk"
    if champion.base_model != challenger_base_model:
        return (
            f"champion `{champion.run}` was fine-tuned from `{champion.base_model}`, the challenger from "
            f"`{challenger_base_model}`: losses on different tokenizations do not compare"
        )
    return None


def judge(
    settings: Settings, challenger: dict[str, Any], champion: Champion | None, data_fingerprint: str
) -> DecisionRecord:
    """Evaluate challenger and champion exports on the challenger's eval set and decide.

    `challenger`: {"run", "path", ...} of its export. A champion that cannot be compared
    (missing export, other base model) counts as no champion: the configured model wins.
    """
    margin = settings.export.promotion_margin
    why_not = comparable(champion, settings.model.name_or_path) if champion else None
    rival = champion if why_not is None else None
    exports = {"challenger": Path(challenger["path"])}
    if rival is not None:
        exports["champion"] = Path(rival.path)
    scores, eval_rows = evaluate_exports(settings, exports)
    if scores:
        decision = decide_promotion(scores["challenger"][EVAL_LOSS], scores.get("champion", {}).get(EVAL_LOSS), margin)
    elif rival is None:
        decision = decide_promotion(None, None, margin)
    else:
        decision = Decision("keep", "no eval data to compare the challenger with the champion: champion kept")
    reason = f"{why_not}; {decision.reason}" if why_not else decision.reason
    return DecisionRecord(
        action=decision.action,
        reason=reason,
        data_fingerprint=data_fingerprint,
        margin=margin,
        champion=asdict(champion) if champion else None,
        challenger=dict(challenger),
        scores=scores,
        eval_rows=eval_rows,
    )


# -- recording ---------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _point_link(exports_dir: Path, target: Path) -> str | None:
    """Repoint `exports/champion` at `target` atomically; skipped (with a note) if a real directory has that name."""
    link = exports_dir / CHAMPION_LINK
    if link.exists() and not link.is_symlink():
        return f"{link} is a real directory (a run named {CHAMPION_LINK!r}?): symlink not updated"
    tmp = exports_dir / f".{CHAMPION_LINK}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, exports_dir), tmp)
    os.replace(tmp, link)
    return None


def _promote(
    ledger: Ledger, home: Path, export: ExportRecord, run_name: str, data_fingerprint: str, *, rollback: bool = False
) -> Path:
    """Mark `export` the only promoted one (one transaction), then point champion.json and the symlink at it.

    The ledger is the truth: a crash before the pointer files are updated leaves them at the
    previous champion until the next promotion rewrites them.
    """
    ledger.promote_export(export.id, rollback=rollback)
    exports_dir = home / "exports"
    exports_dir.mkdir(parents=True, exist_ok=True)
    pointer = {
        "run": run_name,
        "export_id": export.id,
        "path": export.path,
        "step": export.step,
        "metrics": export.metrics,
        "data_fingerprint": data_fingerprint,
        "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    _atomic_write(exports_dir / CHAMPION_FILE, json.dumps(pointer, indent=2, sort_keys=True) + "\n")
    note = _point_link(exports_dir, Path(export.path))
    if note:
        log.warning(note)
    return exports_dir / CHAMPION_FILE


def rollback_target(exports: list[ExportRecord]) -> ExportRecord | None:
    """The champion before the current one, if it is still kept: replaced before the current champion won.

    A rollback restores an export without re-stamping it, so after one rollback the export it
    replaced is *newer* than the champion and is never a target: rolling back twice never
    flips back and forth, and never reaches a pruned export.
    """
    champion = next((e for e in exports if e.promoted), None)
    if champion is None or champion.promoted_at is None:
        return None
    earlier = [
        e for e in exports
        if not e.promoted and e.pruned_at is None and e.promoted_at is not None and e.promoted_at < champion.promoted_at
    ]  # fmt: skip
    return max(earlier, key=lambda e: (e.promoted_at, e.id), default=None)


def rollback(ledger: Ledger, home: Path) -> DecisionRecord:
    """Make the previous champion the champion again (ledger, champion.json, symlink), and record it.

    Raises NothingToRollBackError (exit 2) when there is no champion, or no earlier champion
    that is still kept with its files.
    """
    exports = ledger.exports()
    champion = next((e for e in exports if e.promoted), None)
    if champion is None:
        raise NothingToRollBackError("no champion yet: `ckptflow retrain` promotes the first one")
    target = rollback_target(exports)
    current = ledger.get_run_by_id(champion.run_id).name
    if target is None:
        raise NothingToRollBackError(
            f"nothing to roll back to: no champion before `{current}` is kept (retention keeps the champion and "
            "the previous one; after a rollback, the next step back was pruned or never existed)"
        )
    if not (Path(target.path) / PROVENANCE_NAME).is_file():
        raise NothingToRollBackError(f"the previous champion's export {target.path} is missing on disk: not restored")
    run = ledger.get_run_by_id(target.run_id)
    fingerprint = str(run.config.get(CONFIG_DATA_FINGERPRINT, ""))
    pointer = _promote(ledger, home, target, run.name, fingerprint, rollback=True)
    record = DecisionRecord(
        action="rollback",
        reason=f"rolled back from `{current}` to the previous champion `{run.name}`",
        data_fingerprint=fingerprint,
        margin=0.0,
        champion={"run": current, "export_id": champion.id, "path": champion.path, "step": champion.step},
        challenger={"run": run.name, "export_id": target.id, "path": target.path, "step": target.step},
        pointer=str(pointer),
    )
    _append_decision(home, record)
    return record


def _append_decision(home: Path, record: DecisionRecord) -> None:
    log_file = home / "exports" / DECISIONS_FILE
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("a") as fh:
        fh.write(json.dumps(record.to_json(), sort_keys=True) + "\n")


def record_decision(
    ledger: Ledger, home: Path, record: DecisionRecord, challenger_export_id: int | None = None
) -> DecisionRecord:
    """Act on a decision: on `promote`, update the ledger and the champion pointer; always log it.

    Returns the record with `pointer` set (the champion.json path) when it promoted.
    Raises KeyError when `challenger_export_id` is not in the ledger.
    """
    if record.action == "promote":
        export = next((e for e in ledger.exports() if e.id == challenger_export_id), None)
        if export is None:
            raise KeyError(f"no export with id {challenger_export_id} in the ledger")
        run_name = (record.challenger or {}).get("run") or ledger.get_run_by_id(export.run_id).name
        pointer = _promote(ledger, home, export, run_name, record.data_fingerprint)
        record = DecisionRecord(**{**record.to_json(), "pointer": str(pointer)})
    _append_decision(home, record)
    return record
