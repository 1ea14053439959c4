"""Training step lines reach the Prefect API batched: one log record per batch interval, not one per step.

Every `logging_steps` the trainer logs one readable line (ckptflow.logline). The terminal
shows each at once; sent one by one, each would also be a record the API validates, stores
and broadcasts (~1 ms of CPU per step between this process and the server, on the cores
that train). Here the lines marked `logline.STEP_LINE` are held and go to Prefect's
APILogHandler as one multi-line record — at most every PREFECT_LOGGING_TO_API_BATCH_INTERVAL
seconds, before any other record (so the order holds) and when the chunk ends. Prefect's
APILogWorker then batches records into one request as before; nothing here flushes it.

The terminal side: Prefect's console handler renders every line through rich (~0.6 ms per
line on the training thread). Where its output is not a terminal (a pipe, a file, a worker's
log) rich adds nothing to a step line, so `plain_console_step_lines` writes the same text directly.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.logging.handlers import APILogHandler, PrefectConsoleHandler
from prefect.settings import PREFECT_LOGGING_TO_API_BATCH_INTERVAL

from ckptflow.logline import STEP_LINE

# Where Prefect attaches its API handler for ckptflow's records (PREFECT_LOGGING_EXTRA_LOGGERS=ckptflow).
CKPTFLOW_LOGGER = "ckptflow"
# Most step lines in one record: keeps a record far below Prefect's max log size (1 MB) at any step rate.
MAX_LINES_PER_RECORD = 500


class StepLineBatcher(logging.Filter):
    """A filter on one API handler: step lines are held and handed over together; other records pass.

    `run_ids` (flow run id, task run id) stamp the batched record, which may be sent from a timer
    thread outside the task's run context.
    """

    def __init__(self, handler: logging.Handler, interval: float, run_ids: tuple[str | None, str | None]) -> None:
        super().__init__()
        self.handler, self.interval, self.run_ids = handler, interval, run_ids
        self.held: list[logging.LogRecord] = []
        self.records_sent = 0
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._context = contextvars.copy_context()  # Prefect's settings context, for the timer thread

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, STEP_LINE, False):
            self.flush()  # the step lines before it go first
            return True
        with self._lock:
            self.held.append(record)
            full = len(self.held) >= MAX_LINES_PER_RECORD
            if len(self.held) == 1 and not full:
                self._timer = threading.Timer(self.interval, self._context.copy().run, args=(self.flush,))
                self._timer.daemon = True
                self._timer.start()
        if full:
            self.flush()
        return False

    def flush(self) -> None:
        """Hand the held step lines to the handler as one record (nothing when none are held)."""
        with self._lock:
            held, self.held = self.held, []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if held:
            self.records_sent += 1
            self.handler.handle(_joined(held, self.run_ids))


def _joined(records: list[logging.LogRecord], run_ids: tuple[str | None, str | None]) -> logging.LogRecord:
    """One record with each step line on its own line, stamped with the first line's time and the run ids."""
    first = records[0]
    text = "\n".join(r.getMessage() for r in records)
    joined = logging.LogRecord(first.name, first.levelno, first.pathname, first.lineno, text, None, None)
    joined.created, joined.msecs = first.created, first.msecs
    joined.flow_run_id, joined.task_run_id = run_ids
    return joined


@contextmanager
def batched_step_lines(run_ids: tuple[str | None, str | None]) -> Iterator[list[StepLineBatcher]]:
    """While a chunk trains, step lines reach each Prefect API handler of ckptflow's logger batched.

    Without such a handler (logging to the API off), nothing changes. Held lines are sent on exit.
    """
    interval = max(0.1, float(PREFECT_LOGGING_TO_API_BATCH_INTERVAL.value()))
    handlers = [h for h in logging.getLogger(CKPTFLOW_LOGGER).handlers if isinstance(h, APILogHandler)]
    batchers = [StepLineBatcher(h, interval, run_ids) for h in handlers]
    try:
        with _filtering(handlers, batchers):
            yield batchers
    finally:
        for batcher in batchers:  # after the filters are off: a line logged meanwhile goes straight through
            batcher.flush()


class PlainConsoleStepLines(logging.Filter):
    """A filter on Prefect's console handler writing step lines as plain text (same bytes, no rich rendering)."""

    def __init__(self, handler: PrefectConsoleHandler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, STEP_LINE, False):
            return True
        text = self.handler.format(record) + "\n"
        with self.handler.lock:  # the handler's own lock: lines from other threads don't interleave
            self.handler.stream.write(text)
            self.handler.stream.flush()
        return False


@contextmanager
def plain_console_step_lines() -> Iterator[list[PlainConsoleStepLines]]:
    """While a chunk trains, step lines skip rich on Prefect's console handlers that don't write to a terminal."""
    handlers = [
        h for h in logging.getLogger().handlers
        if isinstance(h, PrefectConsoleHandler) and h.lock is not None and not h.console.is_terminal
    ]  # fmt: skip
    filters = [PlainConsoleStepLines(h) for h in handlers]
    with _filtering(handlers, filters):
        yield filters


@contextmanager
def _filtering(handlers: list[logging.Handler], filters: list[logging.Filter]) -> Iterator[None]:
    """Each handler carries its filter for the duration of the block."""
    for handler, each in zip(handlers, filters):
        handler.addFilter(each)
    try:
        yield
    finally:
        for handler, each in zip(handlers, filters):
            handler.removeFilter(each)
