import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (and database) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


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
