"""Keep the Prefect UI current while a chunk trains: progress at every save, summary and loss curve refreshed.

A watcher thread polls the ledger (cheap: one indexed query) for the newest committed
step. It works the same for every launcher — in-process, a child process, torchrun ranks —
because it reads what the chunk committed, not the trainer's memory. It runs in a copy of
the task's context, so the artifacts it publishes belong to the flow run like the others.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ckptflow.ledger import CheckpointState, Ledger
from ckptflow.settings import Settings
from tasks.reporting import RunProgress, publish_quietly, publish_run_artifacts

log = logging.getLogger(__name__)

# How often the watcher looks at the ledger (seconds): often enough that a save shows within seconds.
POLL_SECONDS = 0.5
# The summary (tables + loss curve PNG, a new artifact version each time) is refreshed at most this often (seconds):
# the UI grows its curve during a long chunk without a version per save piling up in Prefect's database.
SUMMARY_MIN_INTERVAL_SECONDS = 30.0


class LiveSummary:
    """What a committed save changes in the UI: the progress artifact at once, the summary and its loss
    curve at most every SUMMARY_MIN_INTERVAL_SECONDS (the flow publishes the final one at the end)."""

    def __init__(self, settings: Settings, run_name: str, progress: RunProgress, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings, self.run_name, self.progress, self.clock = settings, run_name, progress, clock
        self.summary_at: float | None = None
        self._lock = threading.Lock()

    def saved(self, step: int) -> None:
        self.progress.reached(step)
        if self.summary_at is None or self.clock() - self.summary_at >= SUMMARY_MIN_INTERVAL_SECONDS:
            self._publish()

    def chunk_ended(self) -> None:
        self._publish()

    def _publish(self) -> None:
        with self._lock:  # the watcher thread and the flow may both publish
            self.summary_at = self.clock()
            publish_quietly(publish_run_artifacts.fn, self.settings, self.run_name)


def newest_committed_step(ledger: Ledger, run_name: str) -> int:
    run = ledger.get_run(run_name)
    if run is None:
        return 0
    return max((c.step for c in ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED])), default=0)


class _Watcher(threading.Thread):
    def __init__(self, settings: Settings, run_name: str, on_new_step: Callable[[int], None], start_step: int) -> None:
        super().__init__(name=f"ckptflow-live-{run_name}", daemon=True)
        self.settings, self.run_name, self.on_new_step = settings, run_name, on_new_step
        self.last_step = start_step
        self.stopped = threading.Event()
        self._context = contextvars.copy_context()

    def run(self) -> None:
        self._context.run(self._loop)

    def _loop(self) -> None:
        ledger = Ledger(self.settings.ledger, home=self.settings.home)
        try:
            while not self.stopped.wait(POLL_SECONDS):
                self.poll(ledger)
            self.poll(ledger)  # the chunk's final save
        finally:
            ledger.close()

    def poll(self, ledger: Ledger) -> None:
        try:
            step = newest_committed_step(ledger, self.run_name)
            if step > self.last_step:
                self.last_step = step
                self.on_new_step(step)
        except Exception as exc:  # noqa: BLE001 - the UI is best effort; training must never fail for it
            log.warning("could not refresh the UI of run %s: %s", self.run_name, exc)


@contextmanager
def live_updates(settings: Settings, run_name: str, on_new_step: Callable[[int], None], start_step: int = 0) -> Iterator[None]:
    """Call `on_new_step(step)` (from a thread, in this task's Prefect context) whenever a newer checkpoint commits."""
    watcher = _Watcher(settings, run_name, on_new_step, start_step)
    watcher.start()
    try:
        yield
    finally:
        watcher.stopped.set()
        watcher.join(timeout=30)
