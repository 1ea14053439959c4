"""One SQLAlchemy engine per ledger URL in a process, shared by every `Ledger` open on it.

SQLAlchemy caches the SQL it compiled per engine (the cache key holds the engine's dialect),
and a run opens the ledger 20-30 times — each task, chunk step and background thread opens its
own `Ledger` — so with an engine per open nearly every statement was compiled again (157 of 192
executions at the chunk boundaries of an 8-chunk run; compiling was a third of a ledger call).
Sharing the engine keeps its compiled statements.

Connections still live only while a `Ledger` is open: when the last open `Ledger` of a URL
closes, the engine's pool is disposed (a SQLite file is closed and its WAL checkpointed away,
as before), and the engine waits, without connections, for the next open. A few idle engines
are kept (least recently used first out). An in-memory SQLite URL gets its own engine per open:
each open of it is its own database. A forked child starts with no shared engines: connections
must never cross a fork (SQLite's rule; SQLAlchemy's advice for pools).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine

__all__ = ["acquire", "release"]

# Idle engines (no open Ledger) kept for their compiled statements; a test suite opens thousands of ledgers.
_MAX_IDLE = 8


@dataclass
class _Entry:
    engine: Engine
    users: int = 0


_lock = threading.Lock()
_entries: OrderedDict[tuple[str, bool], _Entry] = OrderedDict()


def acquire(url: str, readonly: bool, make: Callable[[], Engine]) -> Engine:
    """The engine of (`url`, `readonly`), made with `make()` the first time; pair with `release`."""
    key = (url, readonly)
    with _lock:
        entry = _entries.get(key)
        if entry is None:
            entry = _entries[key] = _Entry(make())
        entry.users += 1
        _entries.move_to_end(key)
        return entry.engine


def release(url: str, readonly: bool, engine: Engine) -> None:
    """One `Ledger` on the engine closed; the last one out closes the engine's connections."""
    with _lock:
        entry = _entries.get((url, readonly))
        if entry is None or entry.engine is not engine:  # dropped meanwhile (never while in use): not ours to count
            engine.dispose()
            return
        entry.users -= 1
        if entry.users == 0:
            engine.dispose()
            _drop_idle_beyond_limit()


def _drop_idle_beyond_limit() -> None:
    idle = [key for key, entry in _entries.items() if entry.users == 0]
    for key in idle[: max(0, len(idle) - _MAX_IDLE)]:
        del _entries[key]  # its connections were closed when its last user released it


def _forget_in_child() -> None:
    """After fork: drop the parent's engines without touching their connections (they are the parent's)."""
    global _lock
    _lock = threading.Lock()  # the parent may have held it while forking
    for entry in _entries.values():
        entry.engine.dispose(close=False)
    _entries.clear()


os.register_at_fork(after_in_child=_forget_in_child)
