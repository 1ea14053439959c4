"""Recovery and pruning executors: make the ledger and the checkpoint directories agree.

Plain functions over a `Ledger` and the filesystem (no Prefect, no torch):

- `reconcile` runs at the start of every attempt and finishes whatever a crash left half
  done (stuck `writing` rows, partial directories, unrecorded complete checkpoints,
  interrupted prunes, vanished directories, attempts whose process died);
- `resume_point` picks the newest committed checkpoint that verifies (downloading it from
  `checkpoint.remote_url` when it is only there);
- `verify_run` re-hashes every committed checkpoint and reports partial directories;
- `prune_checkpoints` is the one executor of a retention decision.

Nothing here deletes a directory the ledger does not say ckptflow wrote: a checkpoint
directory is deleted only when its manifest hashes to the ledger's `manifest_sha256` and it
sits in the run's checkpoints dir, a `.pruning-checkpoint-N` only when the ledger row says
`pruned`; unknown or broken directories are quarantined (moved, never deleted).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ckptflow import faults
from ckptflow.integrity import (
    MANIFEST_NAME,
    checkpoint_dirs,
    checkpoint_step,
    manifest_sha256,
    quarantine,
    read_manifest,
    unmanifested_dirs,
    verify_checkpoint,
)
from ckptflow.ledger import CheckpointRecord, CheckpointState, Ledger
from ckptflow.paths import QUARANTINE_DIR
from ckptflow.remote_restore import fetch_remote_copy, has_remote_copy

log = logging.getLogger(__name__)

# Prefix a checkpoint directory is renamed to while it is being deleted by a prune, so a
# half-deleted directory never looks like a `checkpoint-<N>` (HF or we might resume from it).
PRUNING_PREFIX = ".pruning-"


@dataclass(frozen=True)
class ResumePoint:
    step: int
    path: Path
    checkpoint_id: int
    notes: list[str] = field(default_factory=list)


def _pruning_name(path: Path) -> Path:
    return path.with_name(PRUNING_PREFIX + path.name)


def _commit_from_manifest(ledger: Ledger, run_id: int, path: Path) -> list[str]:
    """Commit a complete directory to the ledger from its manifest; returns the problems ([] = committed)."""
    problems = verify_checkpoint(path)
    manifest = read_manifest(path)
    if problems or manifest is None:
        return problems or [f"{path.name}: unreadable manifest"]
    epoch = manifest.metrics.get("epoch")
    ledger.commit_checkpoint(
        run_id,
        manifest.step,
        epoch=float(epoch) if isinstance(epoch, int | float) else None,
        metrics=manifest.metrics,
        bytes=manifest.total_bytes,
        manifest_sha256=manifest_sha256(path) or "",
        path=str(path),
    )
    return []


def _quarantine(path: Path, quarantine_dir: Path, reason: str, notes: list[str]) -> None:
    dest = quarantine(path, quarantine_dir, reason)
    notes.append(f"{path.name}: {reason}; moved to {dest}")


def _finish_prunes(
    ledger: Ledger,
    run_id: int,
    checkpoints_dir: Path,
    quarantine_dir: Path,
    rows: dict[int, CheckpointRecord],
    notes: list[str],
) -> None:
    """Step 0 of reconcile: complete prunes a crash interrupted."""
    root = Path(checkpoints_dir)
    pending = sorted(root.glob(PRUNING_PREFIX + "checkpoint-*")) if root.is_dir() else []
    for path in pending:  # in the run's checkpoints dir by construction
        step = checkpoint_step(path.with_name(path.name.removeprefix(PRUNING_PREFIX)))
        if step is not None and step in rows and rows[step].state == CheckpointState.PRUNED:
            shutil.rmtree(path)
            notes.append(f"checkpoint-{step}: finished an interrupted prune")
        else:  # the ledger never marked it pruned: not ours to delete
            _quarantine(path, quarantine_dir, "a .pruning- directory the ledger does not record as pruned", notes)
    for row in rows.values():
        path = Path(row.path)
        if row.state != CheckpointState.PRUNED or not path.is_dir() or checkpoint_step(path) != row.step:
            continue
        if _in_dir(path, root) and _written_by_ckptflow(path, row):
            _delete_checkpoint_dir(path)
            notes.append(f"checkpoint-{row.step}: finished an interrupted prune")
        else:
            _quarantine(path, quarantine_dir, "pruned in the ledger, but the directory is not the one it recorded", notes)


def _delete_remote_copy(ledger: Ledger, row: CheckpointRecord, remote_url: str) -> str | None:
    """Delete a pruned checkpoint's remote copy and clear its mark; a note, or None when the remote is unreachable.

    An outage does not fail the prune (training goes on): the mark stays, and the next
    `reconcile` deletes the copy.
    """
    from ckptflow.remote import delete_remote
    from ckptflow.remote_fs import RemoteUnavailableError

    run_name = ledger.get_run_by_id(row.run_id).name
    try:
        delete_remote(remote_url, run_name, row.step)
    except RemoteUnavailableError as exc:
        log.warning("checkpoint-%d pruned locally; its remote copy is not deleted yet: %s", row.step, exc)
        return None
    ledger.mark_remote(row.run_id, row.step, None)
    return f"checkpoint-{row.step}: deleted its remote copy (pruned)"


def _finish_remote_prunes(ledger: Ledger, run_id: int, remote_url: str, notes: list[str]) -> None:
    """Step 0b of reconcile: pruned rows whose remote copy is still marked (crash or outage during the prune)."""
    for row in ledger.checkpoints(run_id, [CheckpointState.PRUNED]):
        if has_remote_copy(row, remote_url):
            note = _delete_remote_copy(ledger, row, remote_url)
            if note:
                notes.append(note)


def reconcile(
    ledger: Ledger, run_id: int, checkpoints_dir: Path, quarantine_dir: Path, *, remote_url: str = ""
) -> list[str]:
    """Make the ledger and the checkpoint directories agree after a crash; returns human notes.

    Steps: (0) finish interrupted prunes; (1) rows stuck in `writing`: commit them if the
    directory has a manifest that verifies, else mark `partial` and quarantine the
    directory; (2) `checkpoint-N` directories without a manifest: quarantine, and mark the
    row partial (corrupt if it claimed to be committed); (3) directories with a valid
    manifest the ledger does not know (killed between manifest and ledger commit): commit
    them, and quarantine directories of rows already marked corrupt/partial; (4) committed
    rows whose directory is gone: mark corrupt, unless `remote_url` holds a verified copy
    (an empty home resumes from there); (5) attempts still `running`: their process
    died (the caller is the run's only writer), mark them failed so they no longer protect
    the checkpoint they resumed from.
    """
    checkpoints_dir, quarantine_dir = Path(checkpoints_dir), Path(quarantine_dir)
    notes: list[str] = []
    rows = {r.step: r for r in ledger.checkpoints(run_id)}
    _finish_prunes(ledger, run_id, checkpoints_dir, quarantine_dir, rows, notes)  # (0)
    _finish_remote_prunes(ledger, run_id, remote_url, notes)
    _settle_writing(ledger, run_id, quarantine_dir, rows, notes)  # (1)
    _quarantine_unmanifested(ledger, run_id, checkpoints_dir, quarantine_dir, notes)  # (2)
    _adopt_unrecorded(ledger, run_id, checkpoints_dir, quarantine_dir, notes)  # (3)
    for row in ledger.checkpoints(run_id, [CheckpointState.COMMITTED]):  # (4)
        if not Path(row.path).is_dir() and not has_remote_copy(row, remote_url):
            ledger.mark_checkpoint(run_id, row.step, CheckpointState.CORRUPT, "directory missing")
            notes.append(f"checkpoint-{row.step}: committed but its directory {row.path} is missing; marked corrupt")
    _abandon_running_attempts(ledger, run_id, notes)  # (5)
    for note in notes:
        log.warning("%s", note)
    return notes


def _settle_writing(
    ledger: Ledger, run_id: int, quarantine_dir: Path, rows: dict[int, CheckpointRecord], notes: list[str]
) -> None:
    """Step 1: a row stuck in `writing` is committed if its directory is complete, else partial."""
    for row in rows.values():
        if row.state != CheckpointState.WRITING:
            continue
        path = Path(row.path)
        problems = _commit_from_manifest(ledger, run_id, path) if path.is_dir() else ["directory missing"]
        if not problems:
            notes.append(f"checkpoint-{row.step}: was complete on disk; committed it from its manifest")
            continue
        reason = "interrupted while writing: " + "; ".join(problems)
        ledger.mark_checkpoint(run_id, row.step, CheckpointState.PARTIAL, reason)
        if path.is_dir():
            _quarantine(path, quarantine_dir, reason, notes)
        else:
            notes.append(f"checkpoint-{row.step}: interrupted while writing, nothing on disk; marked partial")


def _quarantine_unmanifested(
    ledger: Ledger, run_id: int, checkpoints_dir: Path, quarantine_dir: Path, notes: list[str]
) -> None:
    """Step 2: a `checkpoint-N` directory without a manifest is partial (corrupt if its row was committed)."""
    rows = {r.step: r for r in ledger.checkpoints(run_id)}
    reason = "no manifest: the checkpoint was not completely written"
    for path in unmanifested_dirs(checkpoints_dir):
        row = rows.get(checkpoint_step(path))  # type: ignore[arg-type]
        if row is not None and Path(row.path).resolve() == path.resolve():
            state = CheckpointState.CORRUPT if row.state == CheckpointState.COMMITTED else CheckpointState.PARTIAL
            ledger.mark_checkpoint(run_id, row.step, state, reason)
        _quarantine(path, quarantine_dir, reason, notes)


def _adopt_unrecorded(
    ledger: Ledger, run_id: int, checkpoints_dir: Path, quarantine_dir: Path, notes: list[str]
) -> None:
    """Step 3: commit complete directories the ledger does not know; move leftovers of corrupt/partial rows away."""
    rows = {r.step: r for r in ledger.checkpoints(run_id)}
    for path in checkpoint_dirs(checkpoints_dir):
        row = rows.get(checkpoint_step(path))  # type: ignore[arg-type]
        if row is not None:
            if row.state in (CheckpointState.CORRUPT, CheckpointState.PARTIAL):  # left behind by a crash
                _quarantine(path, quarantine_dir, row.reason or f"checkpoint marked {row.state}", notes)
            continue
        problems = _commit_from_manifest(ledger, run_id, path)
        if not problems:
            notes.append(f"{path.name}: complete but unrecorded (killed before the ledger commit); committed it")
        else:
            _quarantine(path, quarantine_dir, "unrecorded and does not verify: " + "; ".join(problems), notes)


# Error recorded on an attempt whose process died without recording how it ended.
ABANDONED_ERROR = "abandoned: its process died (killed, OOM, power loss) before recording how the attempt ended"


def _abandon_running_attempts(ledger: Ledger, run_id: int, notes: list[str]) -> None:
    """Step 5: attempts left `running` by a dead process become `failed` (abandoned)."""
    for a in ledger.abandon_attempts(run_id, ABANDONED_ERROR):
        notes.append(
            f"attempt {a.attempt} of chunk {a.chunk} (steps {a.start_step}-{a.end_step}, started "
            f"{a.started_at:%Y-%m-%d %H:%M:%S} UTC) was still running: its process died; marked failed"
        )


def resume_point(
    ledger: Ledger,
    run_id: int,
    checkpoints_dir: Path,
    quarantine_dir: Path,
    *,
    max_step: int | None = None,
    remote_url: str = "",
) -> ResumePoint | None:
    """The newest committed checkpoint (step <= max_step) that verifies; None = start from scratch.

    A checkpoint missing locally (or failing verification: quarantined first) whose copy on
    `remote_url` the ledger marks verified is downloaded and verified again, then used. A
    checkpoint usable neither way is marked corrupt (reason = the problems) and the next
    newest is tried; each such fallback adds a note.
    """
    notes: list[str] = []
    committed = ledger.checkpoints(run_id, [CheckpointState.COMMITTED])
    for row in reversed(committed):
        if max_step is not None and row.step > max_step:
            continue
        path = Path(row.path)
        problems = verify_checkpoint(path, row.manifest_sha256)
        if not problems:
            return ResumePoint(step=row.step, path=path, checkpoint_id=row.id, notes=notes)
        reason = "; ".join(problems)
        where = ""
        if path.exists():
            where = f", quarantined to {quarantine(path, quarantine_dir, 'failed verification: ' + reason)}"
        if has_remote_copy(row, remote_url):
            remote_problems = fetch_remote_copy(ledger, row, remote_url)
            if not remote_problems:
                notes.append(f"checkpoint-{row.step}: local copy {'missing' if not where else 'corrupt'}{where}; "
                             "downloaded its remote copy, which verifies")
                return ResumePoint(step=row.step, path=path, checkpoint_id=row.id, notes=notes)
            reason += "; remote copy: " + "; ".join(remote_problems)
        ledger.mark_checkpoint(run_id, row.step, CheckpointState.CORRUPT, reason)
        note = f"checkpoint-{row.step} corrupt ({reason}){where}; trying an older checkpoint"
        log.warning("%s", note)
        notes.append(note)
    if notes:
        log.warning("run %s: no committed checkpoint verifies; starting from scratch", run_id)
    return None


def verify_run(
    ledger: Ledger, run_id: int, checkpoints_dir: Path | None = None, *, remote_url: str = ""
) -> dict[int, list[str]]:
    """Re-hash every committed checkpoint; {step: problems} for the bad ones. Changes nothing.

    A checkpoint missing locally whose copy on `remote_url` the ledger marks verified is
    checked there instead (re-read from the remote, nothing downloaded).

    With `checkpoints_dir`, also reports `checkpoint-N` directories that are not committed:
    without a manifest (a save that was interrupted, or is in progress) or unknown to the
    ledger. `reconcile` quarantines them at the start of the next attempt.
    """
    bad: dict[int, list[str]] = {}
    rows = {r.step: r for r in ledger.checkpoints(run_id)}
    for row in rows.values():
        if row.state == CheckpointState.COMMITTED:
            if not Path(row.path).exists() and has_remote_copy(row, remote_url):
                from ckptflow.remote import verify_remote

                problems = verify_remote(remote_url, ledger.get_run_by_id(run_id).name, row.step, row.manifest_sha256)
            else:
                problems = verify_checkpoint(Path(row.path), row.manifest_sha256)
            if problems:
                bad[row.step] = problems
    for path in checkpoint_dirs(checkpoints_dir) if checkpoints_dir is not None else []:
        step = checkpoint_step(path)
        row = rows.get(step)  # type: ignore[arg-type]
        if row is not None and row.state == CheckpointState.COMMITTED and Path(row.path).resolve() == path.resolve():
            continue
        state = f"ledger says {row.state}" if row is not None else "unknown to the ledger"
        if read_manifest(path) is None:
            bad.setdefault(step, []).append(  # type: ignore[arg-type]
                f"{path.name}/{MANIFEST_NAME}: missing manifest ({state}): a partial checkpoint (interrupted "
                "or in-progress save), never resumed from"
            )
        else:
            bad.setdefault(step, []).append(f"{path.name}: not committed ({state}); never resumed from")  # type: ignore[arg-type]
    return bad


def _in_dir(path: Path, directory: Path) -> bool:
    """Whether `path` is an entry directly inside `directory` (both resolved)."""
    return path.resolve().parent == Path(directory).resolve()


def _written_by_ckptflow(path: Path, row: CheckpointRecord) -> bool:
    """The ledger's proof that ckptflow wrote `path`: its manifest hashes to what the row recorded."""
    return bool(row.manifest_sha256) and manifest_sha256(path) == row.manifest_sha256


def _unlisted_files(path: Path) -> list[str]:
    """Files below a checkpoint dir that its manifest does not list: someone else put them there."""
    manifest = read_manifest(path)
    listed = {f.path for f in manifest.files} if manifest else set()
    found = (p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() or p.is_symlink())
    return sorted(f for f in found if f not in listed and f != MANIFEST_NAME)


def _delete_checkpoint_dir(path: Path) -> None:
    """Rename to `.pruning-<name>` (atomic), then delete what was renamed; nothing else is touched.

    A directory holding files its manifest does not list is moved to the run's quarantine
    instead (with the reason), so those files survive.
    """
    if not path.is_dir():
        return
    unlisted = _unlisted_files(path)
    if unlisted:
        reason = f"pruned, but kept: it holds files ckptflow did not write ({', '.join(unlisted[:5])})"
        dest = quarantine(path, path.parent.with_name(QUARANTINE_DIR), reason)
        log.warning("checkpoint-%s %s; moved to %s", checkpoint_step(path), reason, dest)
        return
    pending = _pruning_name(path)
    os.replace(path, pending)
    faults.pause("prune-renamed", checkpoint_step(path))
    shutil.rmtree(pending)


def prune_checkpoints(
    ledger: Ledger,
    run_id: int,
    prune: Mapping[int, str],
    *,
    never_delete: Collection[int] = (),
    remote_url: str = "",
) -> list[int]:
    """Execute a retention decision: delete the given steps' directories and mark them pruned.

    `prune` maps step → reason (from policy.py). Steps in `never_delete` and rows that are
    not committed are skipped, and so is a directory the ledger does not prove ckptflow wrote
    (its manifest must hash to the row's). Order per step, crash-safe: (1) mark the row `pruned` (a
    committed row never points at a deleted directory); (2) rename the directory to
    `.pruning-checkpoint-N` (a half-deleted directory never looks like a checkpoint);
    (3) delete it; (4) delete its remote copy on `remote_url`, if the ledger marks one.
    `reconcile` finishes (2)-(4) after a crash. Returns the steps pruned.
    """
    protected = set(never_delete)
    rows = {r.step: r for r in ledger.checkpoints(run_id, [CheckpointState.COMMITTED])}
    done: list[int] = []
    for step in sorted(prune):
        row = rows.get(step)
        if step in protected or row is None:
            continue
        path = Path(row.path)
        if checkpoint_step(path) != step:
            log.warning("not pruning step %s: its path %s is not a checkpoint-%s directory", step, path, step)
            continue
        if path.is_dir() and not _written_by_ckptflow(path, row):
            log.warning("not pruning step %s: %s does not hold the manifest the ledger recorded", step, path)
            continue
        ledger.mark_checkpoint(run_id, step, CheckpointState.PRUNED, prune[step])  # (1)
        faults.pause("prune-marked", step)
        _delete_checkpoint_dir(path)  # (2), (3)
        if has_remote_copy(row, remote_url):
            _delete_remote_copy(ledger, row, remote_url)  # (4)
        done.append(step)
    return done


__all__ = ["ABANDONED_ERROR", "PRUNING_PREFIX", "ResumePoint", "prune_checkpoints", "reconcile", "resume_point", "verify_run"]
