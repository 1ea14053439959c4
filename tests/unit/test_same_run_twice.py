"""The same run submitted twice at once (two workers, one SQLite ledger): its name is created once, and
reopening it never undoes the other submission's `completed`."""

from __future__ import annotations

import threading

import pytest

from ckptflow import pipeline
from ckptflow.ledger import Ledger, RunStatus
from ckptflow.runs import open_run
from tests.helpers import settings_for

SUBMISSIONS = 8


def _ledger(home) -> Ledger:
    return Ledger(f"sqlite:///{home / 'ledger.db'}", home=home)


@pytest.mark.parametrize(
    ("before", "after", "written"),
    [
        (RunStatus.FAILED, RunStatus.RUNNING, True),  # resumed
        (RunStatus.RUNNING, RunStatus.RUNNING, False),  # another submission may be training it: untouched
        (RunStatus.COMPLETED, RunStatus.COMPLETED, False),  # finished by the other submission: stays finished
    ],
)
def test_reopen_run_never_undoes_completed(home, before, after, written):
    home.mkdir()
    with _ledger(home) as ledger:
        run = ledger.create_run("r", fingerprint="f", config={}, base_model="m", total_steps=8)
        ledger.set_run_status(run.id, before)
        was = ledger.get_run("r")
        assert ledger.reopen_run(run.id).status == after
        now = ledger.get_run("r")
        assert now.status == after and (now.updated_at != was.updated_at) == written


def test_submissions_creating_one_run_name_at_once_all_open_the_same_run(home):
    home.mkdir()
    settings = settings_for(home)
    _ledger(home).close()  # the schema exists (as `ckptflow run`'s preflight leaves it)
    start = threading.Barrier(SUBMISSIONS)
    opened, errors = [], []

    def submit() -> None:
        ledger = _ledger(home)  # one engine per submission, as in separate processes
        try:
            start.wait()
            opened.append(open_run(ledger, settings, data_fingerprint="d", train_rows=4, run_name="same"))
        except Exception as exc:  # noqa: BLE001 - collected, asserted below
            errors.append(exc)
        finally:
            ledger.close()

    threads = [threading.Thread(target=submit) for _ in range(SUBMISSIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len({o.run.id for o in opened}) == 1
    assert sum(o.created for o in opened) == 1


def test_run_lease_yields_the_run_as_its_previous_holder_left_it(home):
    """A duplicate that gets the lease after the holder finished sees `completed` and trains nothing."""
    home.mkdir()
    settings = settings_for(home)
    with _ledger(home) as ledger:
        run = ledger.create_run("r", fingerprint="f", config={}, base_model="m", total_steps=8)
    with pipeline.run_lease(settings, "r", "first") as held:
        assert held.status == RunStatus.RUNNING
        pipeline.set_status(settings, "r", RunStatus.COMPLETED)
    with pipeline.run_lease(settings, "r", "duplicate") as held:
        assert held.status == RunStatus.COMPLETED
    with _ledger(home) as ledger:
        assert ledger.lease_holder(run.id) is None
