"""Prefect's database, migrated once per test process, for every Prefect server the tests start.

A Prefect server — `prefect server start`, or the temporary server of `ckptflow run` — on a fresh
PREFECT_HOME runs every migration before it answers: on 2 busy cores that takes longer than the
rest of its start. `seed_prefect_home` gives a new PREFECT_HOME its own copy of one database that
`prefect server database upgrade` made once (the server finds it at head and migrates nothing).
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Prefect's default database file inside PREFECT_HOME (PREFECT_API_DATABASE_CONNECTION_URL unset).
PREFECT_DB_NAME = "prefect.db"
MIGRATE_TIMEOUT_S = 600


@functools.cache
def migrated_prefect_db() -> Path:
    """Prefect's database, created and migrated to head once per test process (removed at exit)."""
    root = Path(tempfile.mkdtemp(prefix="ckptflow-prefect-db-"))
    atexit.register(shutil.rmtree, root, True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CKPTFLOW_"))}
    # `database upgrade` works on the file: no server is called (the URL only keeps it from starting one).
    env.update(PREFECT_HOME=str(root), PREFECT_API_URL="http://127.0.0.1:9/api", PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    prefect = Path(sys.executable).parent / "prefect"
    done = subprocess.run([str(prefect), "server", "database", "upgrade", "-y"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=MIGRATE_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return root / PREFECT_DB_NAME


def seed_prefect_home(prefect_home: Path) -> Path:
    """Give a new server's PREFECT_HOME the migrated database (its own copy: servers share no state); returns it."""
    prefect_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(migrated_prefect_db(), prefect_home / PREFECT_DB_NAME)
    return prefect_home
