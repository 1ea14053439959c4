"""A real PostgreSQL 15 server for tests, started by the test session itself.

    with postgres_server() as server:
        url = server.create_database()   # postgresql+psycopg://USER:PASSWORD@127.0.0.1:PORT/DB

The cluster lives in a fresh temporary directory (data dir, unix socket, log), listens on a
free port on 127.0.0.1 only, and lets TCP clients in only with a password (scram-sha-256).
Its superuser `postgres` is reachable through the unix socket in that directory alone (trust,
but the directory is mode 0700); tests connect as a created role with a random password and
CREATEDB, like a team's ledger user. `initdb` refuses root, so as root the server runs as
the system user `postgres`. On exit the server is stopped and the directory removed.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Debian's PostgreSQL 15 server binaries (package postgresql-15); POSTGRES_BIN_DIR overrides.
DEFAULT_BIN_DIR = Path("/usr/lib/postgresql/15/bin")
# The system user that owns and runs the cluster when tests run as root (initdb refuses root).
SERVER_OS_USER = "postgres"
# The cluster's bootstrap superuser (reachable only through the private unix socket).
SUPERUSER = "postgres"
# Database the test role owns from the start; per-test databases are created next to it.
DEFAULT_DATABASE = "ckptflow"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
# Test-only speed-ups: no fsync (a crashed test server is thrown away anyway).
_FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


class PostgresUnavailable(RuntimeError):
    """The server binaries are missing or the server did not start."""


@dataclass
class PostgresServer:
    """A running test cluster: where it listens and the role tests connect as."""

    root: Path
    port: int
    user: str
    password: str = field(repr=False)
    database: str = DEFAULT_DATABASE
    host: str = "127.0.0.1"
    _created: int = 0

    @property
    def socket_dir(self) -> Path:
        return self.root / "socket"

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the default database (password included: this is a throwaway server)."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    def connect(self, database: str | None = None, *, superuser: bool = False):
        """A psycopg connection (autocommit): as the test role over TCP, or as the superuser over the socket."""
        import psycopg

        if superuser:
            return psycopg.connect(
                host=str(self.socket_dir), port=self.port, user=SUPERUSER, dbname=database or "postgres", autocommit=True
            )
        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database or self.database,
            autocommit=True,
        )

    def create_database(self, name: str | None = None) -> str:
        """CREATE DATABASE (owned by the test role); returns its SQLAlchemy URL. Cheap: a copy of template1."""
        from psycopg import sql

        self._created += 1
        name = name or f"t{self._created}_{secrets.token_hex(3)}"
        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE, closing connections a test left open."""
        from psycopg import sql

        with self.connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def bin_dir() -> Path:
    """Where initdb and postgres are; raises PostgresUnavailable (saying how to install them) if absent."""
    path = Path(os.environ.get("POSTGRES_BIN_DIR") or DEFAULT_BIN_DIR)
    missing = [name for name in ("initdb", "postgres") if not (path / name).is_file()]
    if missing:
        raise PostgresUnavailable(
            f"PostgreSQL server binaries {', '.join(missing)} not found in {path}: "
            f"install them (`apt-get install -y postgresql-15`) or set POSTGRES_BIN_DIR to their directory"
        )
    return path


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """Start a fresh cluster; yield it; stop it and delete every file of it (even on failure)."""
    binaries = bin_dir()
    root = Path(tempfile.mkdtemp(prefix="ckptflow-pg-"))
    proc: subprocess.Popen | None = None
    try:
        owner = _server_os_user()
        _prepare_root(root, owner)
        password = secrets.token_urlsafe(24)
        _initdb(binaries, root, owner)
        server = PostgresServer(root=root, port=0, user=f"ckptflow_{secrets.token_hex(4)}", password=password)
        proc = _start(binaries, server, owner)
        _create_role(server)
        yield server
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def _server_os_user() -> pwd.struct_passwd | None:
    """The OS user to run the cluster as: `postgres` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        raise PostgresUnavailable(
            f"running as root, but there is no system user {SERVER_OS_USER!r} to run PostgreSQL as "
            f"(initdb refuses root): install postgresql-15, which creates it"
        ) from None


def _prepare_root(root: Path, owner: pwd.struct_passwd | None) -> None:
    (root / "socket").mkdir()
    for path in (root, root / "socket"):
        os.chmod(path, 0o700)
        if owner is not None:
            os.chown(path, owner.pw_uid, owner.pw_gid)


def _as(owner: pwd.struct_passwd | None) -> dict:
    """Popen arguments that run a child as `owner` (no extra groups), or as ourselves."""
    if owner is None:
        return {}
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": [], "env": _server_env(owner)}


def _server_env(owner: pwd.struct_passwd) -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": owner.pw_dir, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}


def _initdb(binaries: Path, root: Path, owner: pwd.struct_passwd | None) -> None:
    # 1. TCP needs a password (scram-sha-256); the socket (in a 0700 dir) lets the superuser in to set up.
    done = subprocess.run(
        [
            str(binaries / "initdb"),
            "--pgdata", str(root / "data"),
            "--username", SUPERUSER,
            "--auth-local", "trust",
            "--auth-host", "scram-sha-256",
            "--encoding", "UTF8",
            "--locale", "C.UTF-8",
            "--no-sync",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        **_as(owner),
    )
    if done.returncode != 0:
        raise PostgresUnavailable(f"initdb failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def _start(binaries: Path, server: PostgresServer, owner: pwd.struct_passwd | None) -> subprocess.Popen:
    """Start `postgres` on a free loopback port; retry with another port if one was taken meanwhile."""
    last_log = ""
    for _ in range(3):
        server.port = _free_port()
        log = server.root / "server.log"
        args = [
            str(binaries / "postgres"),
            "-D", str(server.root / "data"),
            "-p", str(server.port),
            "-k", str(server.socket_dir),
            "-c", f"listen_addresses={server.host}",
            "-c", "password_encryption=scram-sha-256",
        ]
        for setting in _FAST_SETTINGS:
            args += ["-c", setting]
        with log.open("ab") as out:
            if owner is not None:
                os.chown(log, owner.pw_uid, owner.pw_gid)
            proc = subprocess.Popen(
                args, cwd=server.root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, **_as(owner),
            )
        if _wait_ready(server, proc):
            return proc
        _stop(proc)
        last_log = log.read_text(errors="replace")[-3000:]
    raise PostgresUnavailable(f"postgres did not start on 127.0.0.1:\n{last_log}")


def _wait_ready(server: PostgresServer, proc: subprocess.Popen) -> bool:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with server.connect(superuser=True):
                return True
        except psycopg.OperationalError:
            time.sleep(0.1)
    return False


def _create_role(server: PostgresServer) -> None:
    """The role tests connect as: password login and CREATEDB, no superuser; owns the default database."""
    from psycopg import sql

    with server.connect(superuser=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                sql.Identifier(server.user), sql.Literal(server.password)
            )
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(server.database), sql.Identifier(server.user))
        )


def _stop(proc: subprocess.Popen) -> None:
    """Fast shutdown (SIGINT: roll back, disconnect clients); SIGKILL the group if it hangs."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Backends are the postmaster's children in its session; none may outlive it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
