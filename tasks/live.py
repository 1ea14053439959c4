"""Keep the Prefect UI current while a chunk trains: progress at every save, summary and loss curve refreshed.

A watcher thread polls the ledger (cheap: one indexed query) for the newest committed
step. It works the same for every launcher — in-process, a child process, torchrun ranks —
because it reads what the chunk committed, not the trainer's memory. It runs in a copy of
the flow's context, so the artifacts it publishes belong to the flow run like the others.

Every API call for these artifacts is made on the watcher thread, never on the flow's: the
thread that trains only wakes the watcher at a chunk's end (`LiveUpdates.chunk_ended`) and never
waits for the Prefect API or for a loss curve to render.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from ckptflow.ledger import CheckpointState, Ledger
from ckptflow.settings import Settings
from tasks.reporting import RunProgress, publish_quietly, publish_run_artifacts

log = logging.getLogger(__name__)

# How often the watcher looks at the ledger (seconds): often enough that a save shows within seconds.
POLL_SECONDS = 0.5
# Between chunk ends the summary (tables + loss curve SVG, a new artifact version each time) is refreshed at most
# this often (seconds): the UI grows its curve during a long chunk without a version per save piling up in
# Prefect's database. The flow publishes the final one at the end.
SUMMARY_MIN_INTERVAL_SECONDS = 30.0
# How long the flow waits at the end for the watcher's last poll and publish (seconds).
STOP_TIMEOUT_SECONDS = 30.0


class LiveView(Protocol):
    """What the watcher keeps current (called from the watcher thread only)."""

    def started(self) -> None: ...

    def refresh(self, new_step: int | None, chunk_ended: bool) -> None:
        """`new_step`: a newer committed step, if any; `chunk_ended`: a chunk ended since the last refresh."""

    def finished(self, new_step: int | None) -> None:
        """The last poll, when the block ends (`new_step` as in refresh)."""


class LiveSummary:
    """The run's live artifacts: progress at every committed save; the summary and its loss curve at every
    chunk end, and between chunk ends at the first save, then at most every SUMMARY_MIN_INTERVAL_SECONDS
    (the flow publishes the final one at the end)."""

    def __init__(self, settings: Settings, run_name: str, progress: RunProgress, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.run_name, self.progress, self.clock = settings, run_name, progress, clock
        self.summary_at: float | None = None

    def started(self) -> None:
        self.progress.publish()

    def refresh(self, new_step: int | None, chunk_ended: bool) -> None:
        if new_step is not None:
            self.progress.reached(new_step)
        due = self.summary_at is None or self.clock() - self.summary_at >= SUMMARY_MIN_INTERVAL_SECONDS
        if chunk_ended or (new_step is not None and due):
            self.summary_at = self.clock()
            publish_quietly(publish_run_artifacts.fn, self.settings, self.run_name)

    def finished(self, new_step: int | None) -> None:
        if new_step is not None:  # progress only: the flow publishes the final summary right after
            self.progress.reached(new_step)


def newest_committed_step(ledger: Ledger, run_name: str) -> int:
    run = ledger.get_run(run_name)
    if run is None:
        return 0
    return max((c.step for c in ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED])), default=0)


class LiveUpdates(threading.Thread):
    """The watcher: `view.started()`, `view.refresh(...)` whenever a newer checkpoint commits or a chunk ends,
    and `view.finished(...)` after its last poll."""

    def __init__(self, settings: Settings, run_name: str, view: LiveView, start_step: int) -> None:
        super().__init__(name=f"ckptflow-live-{run_name}", daemon=True)
        self.settings, self.run_name, self.view = settings, run_name, view
        self.last_step = start_step
        self.stopped = threading.Event()
        self._woken = threading.Event()
        self._chunk_ended = False
        self._flag_lock = threading.Lock()  # the flow thread sets _chunk_ended, this thread takes it
        self._context = contextvars.copy_context()

    def chunk_ended(self) -> None:
        """A chunk just ended (its last save is committed): refresh now instead of at the next interval."""
        with self._flag_lock:
            self._chunk_ended = True
        self._woken.set()

    def stop(self) -> None:
        self.stopped.set()
        self._woken.set()

    def run(self) -> None:
        self._context.run(self._loop)

    def _loop(self) -> None:
        _quietly(self.view.started, self.run_name)
        ledger = Ledger(self.settings.ledger, home=self.settings.home)
        try:
            while True:
                self._woken.wait(POLL_SECONDS)
                self._woken.clear()
                if self.stopped.is_set():  # read before the poll: the last poll starts after stop()
                    self.poll(ledger, last=True)
                    return
                self.poll(ledger)
        finally:
            ledger.close()

    def poll(self, ledger: Ledger, last: bool = False) -> None:
        def check() -> None:
            with self._flag_lock:
                chunk_ended, self._chunk_ended = self._chunk_ended, False
            step = newest_committed_step(ledger, self.run_name)
            new_step = step if step > self.last_step else None
            self.last_step = max(step, self.last_step)
            if last:
                self.view.finished(new_step)
            elif new_step is not None or chunk_ended:
                self.view.refresh(new_step, chunk_ended)

        _quietly(check, self.run_name)


def _quietly(fn: Callable[[], None], run_name: str) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the UI is best effort; training must never fail for it
        log.warning("could not refresh the UI of run %s: %s", run_name, exc)


@contextmanager
def live_updates(settings: Settings, run_name: str, view: LiveView, start_step: int = 0) -> Iterator[LiveUpdates]:
    """Run the watcher for the block (a thread, in this flow's Prefect context); yields it for `chunk_ended()`.

    On exit it polls once more (the last save) and finishes its publishing before returning, so what the
    flow publishes afterwards is the newest version.
    """
    watcher = LiveUpdates(settings, run_name, view, start_step)
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()
        watcher.join(timeout=STOP_TIMEOUT_SECONDS)
