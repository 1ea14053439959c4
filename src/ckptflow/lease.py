"""Hold a run's lease in the ledger while training it: one writer per run, however slow a step is.

The lease expires `LEASE_TTL_SECONDS` after its holder's last heartbeat (or at once when the
holder's pid is dead on this host). A background thread heartbeats every
`LEASE_HEARTBEAT_SECONDS` (a quarter of the TTL), independent of training progress: a slow
step, a long evaluation or an export never lets the lease lapse, while a SIGKILLed process
stops heartbeating with everything else. Training processes additionally call
`Ledger.heartbeat` from a callback, which raises if the lease was lost.

While the lease is held, every write this process makes to the run is fenced by the
acquisition's token (`ckptflow.ledger.holding`): once another process took the lease over,
the ledger refuses them (LeaseLostError), whichever code path makes them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from ckptflow.errors import RunLockedError
from ckptflow.ledger import Fence, Ledger, held_fence, holding
from ckptflow.ledger.store import LEASE_HEARTBEAT_SECONDS, LEASE_TTL_SECONDS

log = logging.getLogger(__name__)

# Makes holder ids unique even where host name and pid repeat (containers: pid 1 everywhere).
_PROCESS_NONCE = uuid.uuid4().hex[:8]


def lease_holder_id() -> str:
    """This process's lease holder id: `host:pid:nonce`."""
    return f"{socket.gethostname()}:{os.getpid()}:{_PROCESS_NONCE}"


class _Heartbeat(threading.Thread):
    """Heartbeat the lease every `interval` seconds until stopped or the lease is lost."""

    def __init__(self, ledger_url: str, fence: Fence, interval: float) -> None:
        super().__init__(name=f"ckptflow-lease-{fence.run_id}", daemon=True)
        self.ledger_url, self.fence, self.interval = ledger_url, fence, interval
        self.run_id, self.holder = fence.run_id, fence.holder
        self.stopped = threading.Event()
        self.lost: str | None = None

    def run(self) -> None:
        ledger = Ledger(self.ledger_url)
        try:
            while not self.stopped.wait(self.interval):
                try:
                    ledger.heartbeat(self.run_id, self.holder, token=self.fence.token)
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
) -> Iterator[Fence]:
    """Acquire the run's lease (RunLockedError if a live process holds it), heartbeat, release on exit.

    Yields the acquisition's fence; this process's writes to the run are fenced by it inside
    the block. Nested use by the same holder in one process reuses the outer lease (taking it
    again would bump the token and fence out the outer block).
    """
    outer = held_fence(ledger_url, run_id)
    if outer is not None and outer.holder == holder:
        yield outer
        return
    ledger = Ledger(ledger_url)
    try:
        grant = ledger.take_lease(run_id, holder, ttl_seconds=ttl_seconds)
        if grant.taken_over:
            log.warning("took over the lease of run %s from %s", run_id, grant.taken_over)
        beat = _Heartbeat(ledger_url, grant.fence, heartbeat_seconds)
        beat.start()
        try:
            with holding(ledger_url, grant.fence):
                yield grant.fence
        finally:
            beat.stopped.set()
            beat.join()
            ledger.release_lease(run_id, holder)
    finally:
        ledger.close()


@contextmanager
def lease_for_write(ledger: Ledger, run_id: int) -> Iterator[Fence]:
    """The run's lease for one short write outside training (`prune`, `export`): the fence this
    process already holds on the run, else a lease taken for the block (RunLockedError while a
    live process trains the run) and released after it. No heartbeat: the block is short.
    """
    held = held_fence(ledger.url, run_id)
    if held is not None:
        yield held
        return
    holder = lease_holder_id()
    grant = ledger.take_lease(run_id, holder)
    if grant.taken_over:
        log.warning("took over the lease of run %s from %s", run_id, grant.taken_over)
    try:
        with holding(ledger.url, grant.fence):
            yield grant.fence
    finally:
        ledger.release_lease(run_id, holder)


__all__ = ["hold_lease", "lease_for_write", "lease_holder_id"]
