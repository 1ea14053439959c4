"""Exports don't pile up: keep the champion, the previous champion and the last N challengers.

Nightly `retrain` exports a merged model per challenger; a year of nights would be 365 full
models. After every decision, retention keeps:

1. the champion (the promoted export);
2. the previous champion (the most recently replaced one: what `rollback` restores);
3. the `keep_challengers` most recent challenger exports;

and prunes the other challenger exports: their directory is deleted (only if it is an
export ckptflow wrote: its provenance file is there) and the ledger row is marked pruned,
with the reason. Exports that are not challengers of `retrain` (`ckptflow run`, `ckptflow
export`) are never touched. Deciding is pure (`decide_export_retention`); `prune_exports` acts.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ckptflow.export import PROVENANCE_NAME
from ckptflow.ledger import ExportRecord, Ledger
from ckptflow.paths import is_within
from ckptflow.remote import delete_remote_export

log = logging.getLogger(__name__)

# Runs `retrain` creates: `retrain-YYYYmmdd-HHMMSS` (promotion.challenger_name), `--new` may add `-k`.
CHALLENGER_RUN = re.compile(r"retrain-\d{8}-\d{6}(-\d+)?")


@dataclass(frozen=True)
class ExportRetention:
    keep: dict[int, str]  # export id -> why it is kept
    prune: dict[int, str]  # export id -> why it goes


def previous_champion(exports: list[ExportRecord]) -> ExportRecord | None:
    """The export most recently replaced as champion (and not pruned): what a rollback restores."""
    replaced = [e for e in exports if not e.promoted and e.promoted_at is not None and e.pruned_at is None]
    return max(replaced, key=lambda e: (e.promoted_at, e.id), default=None)


def decide_export_retention(
    exports: list[ExportRecord], challenger_ids: set[int], keep_challengers: int
) -> ExportRetention:
    """Which of the (not yet pruned) challenger exports to keep, and why; a pure function of the ledger rows."""
    live = [e for e in exports if e.pruned_at is None]
    keep: dict[int, str] = {}
    for e in live:
        if e.promoted:
            keep[e.id] = "champion"
    previous = previous_champion(live)
    if previous is not None:
        keep.setdefault(previous.id, "previous champion (what `ckptflow rollback` restores)")
    challengers = sorted((e for e in live if e.id in challenger_ids), key=lambda e: e.id, reverse=True)
    for e in challengers[:keep_challengers]:
        keep.setdefault(e.id, f"one of the {keep_challengers} most recent challengers")
    prune = {
        e.id: f"older challenger beyond export.keep_challengers={keep_challengers}"
        for e in challengers
        if e.id not in keep
    }
    return ExportRetention(keep, prune)


def challenger_export_ids(ledger: Ledger, exports: list[ExportRecord]) -> set[int]:
    names = {e.run_id: ledger.get_run_by_id(e.run_id).name for e in exports}
    return {e.id for e in exports if CHALLENGER_RUN.fullmatch(names[e.run_id])}


def prune_exports(
    ledger: Ledger, home: Path, keep_challengers: int, *, remote_url: str | None = None, dry_run: bool = False
) -> ExportRetention:
    """Apply export retention: delete what it drops (ckptflow's own export directories only, and their copies
    under `remote_url`/exports/) and record it."""
    exports = ledger.exports()
    decision = decide_export_retention(exports, challenger_export_ids(ledger, exports), keep_challengers)
    if dry_run:
        return decision
    by_id = {e.id: e for e in exports}
    for export_id, reason in sorted(decision.prune.items()):
        path = Path(by_id[export_id].path)
        ledger.mark_export_pruned(export_id, reason)  # first: a crash leaves a row saying "pruned", never a live row without files
        if _ours(path, home):
            shutil.rmtree(path)
            log.info("pruned export %s (%s)", path, reason)
        elif path.exists():
            log.warning("export %s is not one ckptflow wrote under %s/exports: left in place", path, home)
        if remote_url:
            run_name = ledger.get_run_by_id(by_id[export_id].run_id).name
            delete_remote_export(remote_url, run_name, PROVENANCE_NAME)
    return decision


def _ours(path: Path, home: Path) -> bool:
    """An export directory ckptflow wrote (provenance present), strictly inside the home's exports/."""
    inside = is_within(path, home / "exports") and path.resolve() != (home / "exports").resolve()
    return inside and path.is_dir() and not path.is_symlink() and (path / PROVENANCE_NAME).is_file()


__all__ = ["CHALLENGER_RUN", "ExportRetention", "decide_export_retention", "previous_champion", "prune_exports"]
