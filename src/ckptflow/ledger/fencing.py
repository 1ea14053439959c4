"""Fencing tokens of run leases: which acquisition a write is made under.

Every acquisition of a run's lease increments its token (see `Ledger.take_lease`). A write
made under a `Fence` (run, holder, token) is refused once another process took the lease
over. `holding` makes a fence implicit for a block: every write this process then makes to
that run, through any `Ledger` on that URL and from any code path, is checked against it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Fence:
    """A lease as one acquisition holds it: writes on its behalf are refused once it was taken over."""

    run_id: int
    holder: str
    token: int


@dataclass(frozen=True)
class LeaseGrant:
    fence: Fence
    taken_over: str | None  # who held it before, if it was taken over


# Fences held by this process, by (ledger URL, run id): writes to that run through any
# Ledger on that URL are checked against them (see `holding`).
_held_fences: dict[tuple[str, int], Fence] = {}
_held_lock = threading.Lock()


@contextlib.contextmanager
def holding(url: str, fence: Fence) -> Iterator[None]:
    """While inside, every write this process makes to `fence.run_id` on `url` is fenced by it."""
    key = (url, fence.run_id)
    with _held_lock:
        outer = _held_fences.get(key)
        _held_fences[key] = fence
    try:
        yield
    finally:
        with _held_lock:
            if outer is None:
                _held_fences.pop(key, None)
            else:
                _held_fences[key] = outer


def held_fence(url: str, run_id: int) -> Fence | None:
    """The fence this process holds on the run (see `holding`), if any."""
    with _held_lock:
        return _held_fences.get((url, run_id))


__all__ = ["Fence", "LeaseGrant", "held_fence", "holding"]
