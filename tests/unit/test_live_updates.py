"""The live UI watcher (tasks/live.py) on a real SQLite ledger: it reports every newly committed step from its
own thread, a nudge makes it look at once, and leaving the block waits for its last report."""

from __future__ import annotations

import threading

import pytest

from ckptflow.ledger import Ledger
from tasks import live
from tests.helpers import settings_for

RUN = "r"


@pytest.fixture
def ledger_settings(home):
    settings = settings_for(home)
    with Ledger(settings.ledger, home=settings.home) as ledger:
        ledger.create_run(RUN, fingerprint="f", config={}, base_model="m", total_steps=8)
    return settings


def _commit(settings, step: int) -> None:
    with Ledger(settings.ledger, home=settings.home) as ledger:
        run = ledger.get_run(RUN)
        path = settings.checkpoints_dir(RUN) / f"checkpoint-{step}"
        ledger.begin_checkpoint(run.id, step, str(path))
        ledger.commit_checkpoint(run.id, step, epoch=None, metrics={}, bytes=1, manifest_sha256="0" * 64)


class _Reports:
    """What the watcher reported, and on which thread."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.threads: set[str] = set()
        self.reported = threading.Event()

    def on_start(self) -> None:
        self.threads.add(threading.current_thread().name)

    def on_new_step(self, step: int) -> None:
        self.steps.append(step)
        self.threads.add(threading.current_thread().name)
        self.reported.set()


def test_a_nudge_reports_the_committed_step_at_once_from_the_watcher_thread(ledger_settings, monkeypatch):
    monkeypatch.setattr(live, "POLL_SECONDS", 3600.0)  # only nudge() and the exit can make it look
    reports = _Reports()
    with live.live_updates(ledger_settings, RUN, reports.on_new_step, on_start=reports.on_start) as watcher:
        _commit(ledger_settings, 2)
        watcher.nudge()
        assert reports.reported.wait(30), "a nudge did not make the watcher poll"
        assert reports.steps == [2]
    assert reports.threads == {f"ckptflow-live-{RUN}"}  # never the caller's thread


def test_leaving_the_block_reports_the_last_save_and_never_goes_back(ledger_settings, monkeypatch):
    monkeypatch.setattr(live, "POLL_SECONDS", 3600.0)
    _commit(ledger_settings, 2)
    reports = _Reports()
    with live.live_updates(ledger_settings, RUN, reports.on_new_step, start_step=2):  # already done: not reported
        _commit(ledger_settings, 4)
        _commit(ledger_settings, 6)
    assert reports.steps == [6]  # the newest committed step, polled after the block ended


def test_a_failing_report_is_logged_and_the_watcher_carries_on(ledger_settings, monkeypatch, caplog):
    monkeypatch.setattr(live, "POLL_SECONDS", 3600.0)
    seen: list[int] = []

    def flaky(step: int) -> None:
        seen.append(step)
        if len(seen) == 1:
            raise ConnectionError("Prefect API unreachable")

    with live.live_updates(ledger_settings, RUN, flaky) as watcher:
        _commit(ledger_settings, 2)
        watcher.nudge()
        _commit(ledger_settings, 4)
    assert seen[-1] == 4 and "Prefect API unreachable" in caplog.text
