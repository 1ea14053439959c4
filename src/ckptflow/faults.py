"""Fault injection for tests and drills: pause at a named point of the checkpoint lifecycle.

A pause makes a short-lived state (a half-written checkpoint, a prune between its ledger
update and its delete, an export not yet swapped in) last long enough for a drill to
*observe* it on disk or in the ledger and then SIGKILL the process. Off unless
`settings.fault.pause_at` is set; `configure` is called by the code paths that train,
prune and export (each process configures itself from its settings).
"""

from __future__ import annotations

import logging
import threading
import time

from ckptflow.settings import FaultSettings

log = logging.getLogger(__name__)

# Where `pause` can stop, and the state a drill observes while it sleeps there.
# Where `pause` can stop, and the state a drill observes while it sleeps there. The points of the
# commit (files-written … commit-recorded, prune-*) are on the background committer's thread:
# training goes on meanwhile, up to the chunk end, where it waits for the commits.
PAUSE_POINTS: dict[str, str] = {
    "step-end": "optimizer step N is done, nothing of it saved yet",
    "save-begun": "the ledger row of checkpoint N is `writing`; HF has written nothing yet (training waits for the row)",
    "mid-save": "HF wrote the adapter weights of checkpoint N, not yet the optimizer state; no manifest",
    "files-written": "HF wrote every file of checkpoint N; its commit has not started (no manifest)",
    "files-hashed": "every file of checkpoint N is hashed and fsynced; no manifest yet",
    "manifest-written": "the manifest of checkpoint N is in place; the ledger row is still `writing`",
    "commit-recorded": "the ledger row of checkpoint N is `committed`; retention has not run for it yet",
    "prune-marked": "the ledger row of pruned checkpoint N says `pruned`; its directory is untouched",
    "prune-renamed": "pruned checkpoint N was renamed to .pruning-checkpoint-N, not yet deleted",
    "export-written": "the export of checkpoint N is written and checked in a temp dir, not swapped in",
    "export-swapped": "the export of checkpoint N is in place, not yet recorded in the ledger",
}

_lock = threading.Lock()
_active: FaultSettings | None = None
_done = False  # a process pauses at most once


def configure(fault: FaultSettings) -> None:
    """Arm (or disarm) pauses for this process from its settings."""
    global _active
    with _lock:
        _active = fault if fault.pause_at else None


def armed(point: str, step: int | None = None) -> bool:
    """Whether `pause(point, step)` would sleep (for code that must wait for another thread's pause)."""
    assert point in PAUSE_POINTS, point
    with _lock:
        return _armed_for(point, step)


def _armed_for(point: str, step: int | None) -> bool:
    fault = _active
    if fault is None or _done or fault.pause_at != point:
        return False
    return fault.pause_step is None or step == fault.pause_step


def pause(point: str, step: int | None = None) -> None:
    """Sleep `pause_seconds` if this process is armed for `point` (and `step`); at most once per process."""
    global _done
    assert point in PAUSE_POINTS, point
    with _lock:
        fault = _active
        if not _armed_for(point, step):
            return
        _done = True
    log.warning("fault injection: pausing %.0fs at %s (step %s): %s", fault.pause_seconds, point, step, PAUSE_POINTS[point])
    time.sleep(fault.pause_seconds)


__all__ = ["PAUSE_POINTS", "armed", "configure", "pause"]
