"""Hold a run's lease in the ledger while training it: one writer per run, however slow a step is.

The lease expires `LEASE_TTL_SECONDS` after its holder's last heartbeat (or at once when the
holder's pid is dead on this host). A background thread heartbeats every
`LEASE_HEARTBEAT_SECONDS` (a quarter of the TTL), independent of training progress: a slow
step, a long evaluation or an export never lets the lease lapse, while a SIGKILLed process
stops heartbeating with everything else. Training processes additionally call
`Ledger.heartbeat` from a callback, which raises if the lease was lost (a fence).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ckptflow.errors import RunLockedError
from ckptflow.ledger import Ledger
from ckptflow.ledger.store import LEASE_HEARTBEAT_SECONDS, LEASE_TTL_SECONDS

log = logging.getLogger(__name__)


class _Heartbeat(threading.Thread):
    """Heartbeat the lease every `interval` seconds until stopped or the lease is lost."""

    def __init__(self, ledger_url: str, run_id: int, holder: str, interval: float) -> None:
        super().__init__(name=f"ckptflow-lease-{run_id}", daemon=True)
        self.ledger_url, self.run_id, self.holder, self.interval = ledger_url, run_id, holder, interval
        self.stopped = threading.Event()
        self.lost: str | None = None

    def run(self) -> None:
        ledger = Ledger(self.ledger_url)
        try:
            while not self.stopped.wait(self.interval):
                try:
                    ledger.heartbeat(self.run_id, self.holder)
                except RunLockedError as exc:
                    self.lost = str(exc)
                    log.error("lost the lease of run %s: %s", self.run_id, exc)
                    return
                except Exception as exc:  # a busy database: try again next interval
                    log.warning("lease heartbeat of run %s failed (retrying): %s", self.run_id, exc)
        finally:
            ledger.close()


@contextmanager
def hold_lease(
    ledger_url: str,
    run_id: int,
    holder: str,
    *,
    ttl_seconds: float = LEASE_TTL_SECONDS,
    heartbeat_seconds: float = LEASE_HEARTBEAT_SECONDS,
) -> Iterator[None]:
    """Acquire the run's lease (RunLockedError if a live process holds it), heartbeat, release on exit."""
    ledger = Ledger(ledger_url)
    try:
        taken_over = ledger.acquire_lease(run_id, holder, ttl_seconds=ttl_seconds)
        if taken_over:
            log.warning("took over the lease of run %s from %s", run_id, taken_over)
        beat = _Heartbeat(ledger_url, run_id, holder, heartbeat_seconds)
        beat.start()
        try:
            yield
        finally:
            beat.stopped.set()
            beat.join()
            ledger.release_lease(run_id, holder)
    finally:
        ledger.close()


__all__ = ["hold_lease"]
