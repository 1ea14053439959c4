import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """The Prefect API of every in-process flow test: the drills' server (tests/drills.py `session_server`).

    One real `prefect server start` on a migrated database serves the drills' processes and these tests
    alike, instead of a second server (prefect_test_harness) that migrates a fresh database first.
    As in prefect_test_harness, the URL is also the process-global setting: Prefect's log and event
    workers run in threads that do not see this context. They are drained while the server still runs."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.drills import session_server

    with temporary_settings({PREFECT_API_URL: session_server().api_url}):
        with _temporary_global_settings_context(get_settings_context()):
            yield
            APILogWorker.drain_all(timeout=30)
            EventsWorker.drain_all()


@pytest.fixture(scope="session")
def completed_home_template(tmp_path_factory):
    """A home holding one completed, exported run `base` (tutorial defaults), trained once per session without Prefect."""
    import os

    from tests.helpers import finish_without_prefect, settings_for, train_without_prefect

    root = tmp_path_factory.mktemp("completed")
    home = root / "home"
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("CKPTFLOW_")}
    try:
        settings = settings_for(home)
        train_without_prefect(settings, "base")
        finish_without_prefect(settings, "base")
    finally:
        os.environ.update(saved)
    return home


@pytest.fixture
def completed_home(completed_home_template, home):
    """A private copy of the completed home at this test's CKPTFLOW_HOME (paths in the ledger follow the copy)."""
    import shutil
    import sqlite3

    shutil.copytree(completed_home_template, home, symlinks=True)
    con = sqlite3.connect(home / "ledger.db")
    try:
        old, new = str(completed_home_template.resolve()), str(home.resolve())
        for table in ("checkpoints", "exports"):
            con.execute(f"UPDATE {table} SET path = replace(path, ?, ?)", (old, new))
        con.commit()
    finally:
        con.close()
    return home
