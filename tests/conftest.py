"""Shared test setup: offline, quiet, no analytics; every test gets its own CKPTFLOW_HOME."""

import os
import signal

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import pytest

from tests.s3 import s3, s3_remote  # noqa: E402,F401 - one local S3 server (moto) shared by every module of the session

# pytest started in the background by a non-interactive shell (`make test &`, nohup) inherits SIGINT ignored, and so
# would every worker and server the tests start: Prefect stops a worker on SIGTERM by sending itself SIGINT, which
# it then ignored until the teardown's SIGKILL 15 s later. The processes the tests start get Ctrl-C as a terminal would.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh CKPTFLOW_HOME, and a cwd without a stray .env."""
    h = tmp_path / "home"
    monkeypatch.setenv("CKPTFLOW_HOME", str(h))
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("CKPTFLOW_") and key != "CKPTFLOW_HOME":
            monkeypatch.delenv(key)
    return h


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL 15 server for the session (tests/postgres.py): loopback, password auth, no leftovers.

    Fails (not skips) when the server binaries are missing: CI must have them."""
    from tests.postgres import postgres_server as start_postgres

    with start_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's PostgreSQL server: its SQLAlchemy URL (`postgresql+psycopg://…`)."""
    from sqlalchemy.engine import make_url

    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(make_url(url).database)


@pytest.fixture(params=["sqlite", "postgres"])
def ledger_url(request, tmp_path) -> str:
    """A fresh, empty ledger database on each backend: a SQLite file, then a database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("postgres_url")
