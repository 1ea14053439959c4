"""Bring remote copies home: the ledger's committed checkpoints that exist only on `checkpoint.remote_url`.

A machine with an empty CKPTFLOW_HOME (same ledger, same remote) resumes and exports from
these. A copy is placed only after it verifies against the ledger's manifest sha256
(remote.download_checkpoint); one that does not is never used.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ckptflow.errors import CorruptCheckpointError
from ckptflow.ledger import CheckpointRecord, CheckpointState, Ledger
from ckptflow.remote import download_checkpoint

log = logging.getLogger(__name__)


def has_remote_copy(row: CheckpointRecord, remote_url: str) -> bool:
    """Whether the ledger says `row` has a verified copy on `remote_url` (and a remote is configured)."""
    return bool(remote_url) and row.remote_at is not None


def fetch_remote_copy(ledger: Ledger, row: CheckpointRecord, remote_url: str) -> list[str]:
    """Download `row`'s remote copy to its ledger path; [] when it is now local and verified, else the problems.

    Raises RemoteUnavailableError / RemoteConfigError when the remote cannot be read at all:
    an outage is not evidence that the copy is bad.
    """
    run_name = ledger.get_run_by_id(row.run_id).name
    try:
        download_checkpoint(remote_url, run_name, row.step, Path(row.path), row.manifest_sha256)
    except CorruptCheckpointError as exc:  # RemoteVerifyError included: the copy does not match the ledger
        log.warning("remote copy of checkpoint-%d of run %s not usable: %s", row.step, run_name, exc)
        return [str(exc)]
    log.info("checkpoint-%d of run %s downloaded from the remote and verified", row.step, run_name)
    return []


def fetch_missing(ledger: Ledger, run_id: int, remote_url: str, *, step: int | None = None) -> list[str]:
    """Download every committed checkpoint (or only `step`) missing locally that has a remote copy; notes.

    A copy that does not verify marks the row corrupt (with the problems): never used, and the
    caller's choice falls back to the next checkpoint.
    """
    notes: list[str] = []
    for row in ledger.checkpoints(run_id, [CheckpointState.COMMITTED]):
        if (step is not None and row.step != step) or Path(row.path).exists() or not has_remote_copy(row, remote_url):
            continue
        problems = fetch_remote_copy(ledger, row, remote_url)
        if problems:
            reason = "remote copy failed verification: " + "; ".join(problems)
            ledger.mark_checkpoint(run_id, row.step, CheckpointState.CORRUPT, reason)
            notes.append(f"checkpoint-{row.step}: only on the remote, and its copy does not verify; not used")
        else:
            notes.append(f"checkpoint-{row.step}: downloaded from the remote and verified")
    return notes


__all__ = ["fetch_missing", "fetch_remote_copy", "has_remote_copy"]
