"""The live UI watcher (tasks/live.py) on a real SQLite ledger: it reports every newly committed step and every
chunk end from its own thread, a chunk end makes it look at once, and leaving the block waits for its last report."""

from __future__ import annotations

import threading

import pytest

from ckptflow.ledger import Ledger
from tasks import live
from tests.helpers import settings_for

RUN = "r"


@pytest.fixture
def ledger_settings(home, monkeypatch):
    monkeypatch.setattr(live, "POLL_SECONDS", 3600.0)  # only chunk_ended() and the exit make the watcher look
    settings = settings_for(home)
    with Ledger(settings.ledger, home=settings.home) as ledger:
        ledger.create_run(RUN, fingerprint="f", config={}, base_model="m", total_steps=8)
    return settings


def _commit(settings, step: int) -> None:
    with Ledger(settings.ledger, home=settings.home) as ledger:
        run = ledger.get_run(RUN)
        ledger.begin_checkpoint(run.id, step, str(settings.checkpoints_dir(RUN) / f"checkpoint-{step}"))
        ledger.commit_checkpoint(run.id, step, epoch=None, metrics={}, bytes=1, manifest_sha256="0" * 64)


class _View:
    """A LiveView that records what it was told, and on which thread."""

    def __init__(self, fail_first: bool = False) -> None:
        self.refreshes: list[tuple[int | None, bool]] = []
        self.finished_at: list[int | None] = []
        self.threads: set[str] = set()
        self.refreshed = threading.Event()
        self.fail_first = fail_first

    def started(self) -> None:
        self.threads.add(threading.current_thread().name)

    def refresh(self, new_step: int | None, chunk_ended: bool) -> None:
        self.refreshes.append((new_step, chunk_ended))
        self.threads.add(threading.current_thread().name)
        self.refreshed.set()
        if self.fail_first and len(self.refreshes) == 1:
            raise ConnectionError("Prefect API unreachable")

    def finished(self, new_step: int | None) -> None:
        self.finished_at.append(new_step)


def test_a_chunk_end_is_shown_at_once_from_the_watcher_thread(ledger_settings):
    view = _View()
    with live.live_updates(ledger_settings, RUN, view) as watcher:
        _commit(ledger_settings, 2)
        watcher.chunk_ended()
        assert view.refreshed.wait(30), "a chunk end did not make the watcher look"
        assert view.refreshes == [(2, True)]
    assert view.threads == {f"ckptflow-live-{RUN}"}  # never the caller's thread
    assert view.finished_at == [None]  # the last poll found nothing newer


def test_leaving_the_block_reports_the_last_save_and_never_goes_back(ledger_settings):
    _commit(ledger_settings, 2)
    view = _View()
    with live.live_updates(ledger_settings, RUN, view, start_step=2):  # already done: not reported
        _commit(ledger_settings, 4)
        _commit(ledger_settings, 6)
    assert view.refreshes == [] and view.finished_at == [6]  # the newest committed step, polled after the block ended


def test_a_failing_refresh_is_logged_and_the_watcher_carries_on(ledger_settings, caplog):
    view = _View(fail_first=True)
    with live.live_updates(ledger_settings, RUN, view) as watcher:
        _commit(ledger_settings, 2)
        watcher.chunk_ended()
        assert view.refreshed.wait(30)
        _commit(ledger_settings, 4)
        watcher.chunk_ended()
        assert _wait_for(lambda: len(view.refreshes) == 2)
    assert view.refreshes == [(2, True), (4, True)] and "Prefect API unreachable" in caplog.text


def _wait_for(condition, seconds: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


class _Progress:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def publish(self) -> None: ...

    def reached(self, step: int) -> None:
        self.steps.append(step)


@pytest.mark.parametrize(
    ("refreshes", "expected_summaries"),
    [
        ([(2, False)], 1),  # the first save
        ([(2, False), (4, False)], 1),  # the next save within the interval: progress only
        ([(2, False), (None, True)], 2),  # a chunk end always refreshes the summary
        ([(2, False), (4, False), (None, True), (6, False)], 2),
    ],
)
def test_the_summary_follows_chunk_ends_and_at_most_the_interval_between(home, monkeypatch, refreshes, expected_summaries):
    published: list[str] = []
    monkeypatch.setattr(live, "publish_quietly", lambda fn, settings, run_name: published.append(run_name))
    progress = _Progress()
    summary = live.LiveSummary(settings_for(home), RUN, progress, clock=lambda: 100.0)  # time stands still
    for new_step, chunk_ended in refreshes:
        summary.refresh(new_step, chunk_ended)
    summary.finished(8)  # the last poll moves the progress only: the flow publishes the final summary
    assert len(published) == expected_summaries
    assert progress.steps == [step for step, _ in refreshes if step is not None] + [8]
