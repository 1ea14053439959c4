"""Step lines reach Prefect's API handler batched: one multi-line record per interval, order kept, nothing lost."""

from __future__ import annotations

import logging
import time

import pytest
from prefect.logging.handlers import APILogHandler

from ckptflow.logline import STEP_LINE
from tasks.step_lines import CKPTFLOW_LOGGER, MAX_LINES_PER_RECORD, StepLineBatcher, batched_step_lines

RUN_IDS = ("11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222")


class Kept(APILogHandler):
    """Prefect's API handler, keeping what it would send instead of queueing it for the server."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.sent.append(record)


def _record(text: str, step_line: bool) -> logging.LogRecord:
    record = logging.LogRecord("ckptflow.chunks", logging.INFO, __file__, 1, "%s", (text,), None)
    setattr(record, STEP_LINE, step_line)
    return record


def _send(handler: logging.Handler, events: list[tuple[str, bool]]) -> None:
    for text, step_line in events:
        handler.handle(_record(text, step_line))


@pytest.mark.parametrize(
    ("events", "sent"),
    [
        ([("step 1", True), ("step 2", True)], ["step 1\nstep 2"]),
        ([("step 1", True), ("step 2", True), ("eval at 2", False), ("step 3", True)], ["step 1\nstep 2", "eval at 2", "step 3"]),
        ([("committed checkpoint-2", False)], ["committed checkpoint-2"]),
        ([], []),
    ],
    ids=["held-until-the-end", "other-records-keep-their-place", "others-pass-at-once", "nothing"],
)
def test_step_lines_are_joined_and_other_records_keep_their_order(events, sent):
    handler = Kept()
    batcher = StepLineBatcher(handler, interval=60, run_ids=RUN_IDS)
    handler.addFilter(batcher)
    _send(handler, events)
    batcher.flush()
    assert [r.getMessage() for r in handler.sent] == sent


def test_the_joined_record_has_the_first_lines_time_and_the_run_ids():
    handler = Kept()
    batcher = StepLineBatcher(handler, interval=60, run_ids=RUN_IDS)
    handler.addFilter(batcher)
    first = _record("step 1", True)
    first.created = 1000.25
    handler.handle(first)
    _send(handler, [("step 2", True)])
    batcher.flush()
    (joined,) = handler.sent
    assert (joined.created, joined.flow_run_id, joined.task_run_id) == (1000.25, *RUN_IDS)
    assert APILogHandler().prepare(joined)["message"] == "step 1\nstep 2"  # what Prefect would send: no context needed


def test_held_lines_go_after_the_interval_without_another_record():
    handler = Kept()
    batcher = StepLineBatcher(handler, interval=0.2, run_ids=RUN_IDS)
    handler.addFilter(batcher)
    _send(handler, [("step 1", True), ("step 2", True)])
    assert handler.sent == []
    deadline = time.monotonic() + 10
    while not handler.sent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r.getMessage() for r in handler.sent] == ["step 1\nstep 2"]


def test_a_record_never_holds_more_than_the_maximum_lines():
    handler = Kept()
    batcher = StepLineBatcher(handler, interval=60, run_ids=RUN_IDS)
    handler.addFilter(batcher)
    lines = [f"step {i}" for i in range(2 * MAX_LINES_PER_RECORD + 7)]
    _send(handler, [(line, True) for line in lines])
    batcher.flush()
    assert [len(r.getMessage().splitlines()) for r in handler.sent] == [MAX_LINES_PER_RECORD, MAX_LINES_PER_RECORD, 7]
    assert "\n".join(r.getMessage() for r in handler.sent).splitlines() == lines  # nothing lost, nothing twice


def test_batching_applies_to_ckptflows_api_handler_while_a_chunk_runs_and_is_removed_after():
    logger = logging.getLogger(CKPTFLOW_LOGGER)
    handler = Kept()
    logger.addHandler(handler)
    previous_level = logger.level
    logger.setLevel(logging.INFO)
    child = logging.getLogger("ckptflow.chunks")
    try:
        with batched_step_lines(RUN_IDS) as batchers:
            for step in (1, 2, 3):
                child.info("step %d/3 (x%%)", step, extra={STEP_LINE: True})
            # Only ours is asserted: an earlier test may have left Prefect's own API handler on the logger.
            assert handler.sent == [] and len([b for b in batchers if b in handler.filters]) == 1
        assert [r.getMessage() for r in handler.sent] == ["step 1/3 (x%)\nstep 2/3 (x%)\nstep 3/3 (x%)"]
        assert handler.filters == []
        child.info("step %d/3 (x%%)", 4, extra={STEP_LINE: True})  # after the chunk: as before, one record each
        assert [r.getMessage() for r in handler.sent][-1] == "step 4/3 (x%)"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


def test_step_lines_reach_a_console_that_is_no_terminal_as_the_same_text_without_rich(tmp_path):
    """Same bytes as Prefect's rich console handler writes to a file; other records still go through rich."""
    from prefect.logging.formatters import PrefectFormatter
    from prefect.logging.handlers import PrefectConsoleHandler

    from tasks.step_lines import plain_console_step_lines

    def handler_writing_to(path):
        handler = PrefectConsoleHandler(stream=open(path, "w"))
        handler.setFormatter(PrefectFormatter("%(levelname)s | %(name)s - %(message)s"))
        return handler

    line = "step 3/12 (25%) · loss 6.3 · lr 2.00e-04 · grad 0.21 · 25 steps/s · ETA 0:00:00"
    events = [(line, True), ("committed checkpoint-3 (1234 bytes, eval_loss=6.9)", False), (line, True)]
    rich, plain = handler_writing_to(tmp_path / "rich.txt"), handler_writing_to(tmp_path / "plain.txt")
    root = logging.getLogger()
    _send(rich, events)
    root.addHandler(plain)
    try:
        with plain_console_step_lines() as filters:
            assert [f.handler for f in filters if f.handler is plain] == [plain]
            _send(plain, events)
    finally:
        root.removeHandler(plain)
    rich.stream.close()
    plain.stream.close()
    assert (tmp_path / "plain.txt").read_text() == (tmp_path / "rich.txt").read_text()
    assert (tmp_path / "plain.txt").read_text().count("step 3/12") == 2
    assert plain.filters == []
