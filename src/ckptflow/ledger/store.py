"""The ledger: runs, checkpoints, attempts, exports and run leases in one SQL database.

Every public method is one short transaction and returns plain frozen records (never ORM
objects), so callers hold no session and no lock between calls. On SQLite:

- WAL journal: readers never block the writer and vice versa;
- writes start with `BEGIN IMMEDIATE` (SQLAlchemy's pysqlite recipe: the driver's own
  BEGIN is disabled and a `begin` event emits ours), so two processes writing at once wait
  for the lock (busy timeout) instead of failing with "database is locked" on an upgrade
  from a read to a write lock;
- foreign keys on, on every connection.

The schema comes only from the Alembic migrations shipped in this package; opening a
`Ledger` upgrades the database to head.

Paths under the ledger's home (`CKPTFLOW_HOME`) are stored relative to it and returned
absolute against the home of *this* `Ledger`, so a moved or copied home keeps working;
paths outside the home (an export to an explicit `--out`) are stored absolute.

Leases are fenced: every acquisition increments the lease's `token`, and a write made on
behalf of a holder (a `Fence`: run, holder, token) first updates the lease row `WHERE
holder = ? AND token = ?` in the same transaction. Once another process took the lease
over, that matches no row and the write is refused (LeaseLostError); on PostgreSQL the
row lock it takes also makes a concurrent take-over wait for the write's commit.

On a server database (PostgreSQL) connections can drop: a restart, a failover, a killed
backend. Idle pooled connections are tested before use (`pool_pre_ping`), and a call whose
connection drops mid-transaction, or cannot connect, is run again from the start, a few
times with growing pauses (`_retried_on_disconnect`); every call is one short transaction,
so a retry repeats all or nothing. When the server stays away the call raises
LedgerUnavailableError: the training attempt fails, and the next one resumes from what was
committed.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, func, insert, inspect, select, text, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from ckptflow.errors import LeaseLostError, LedgerError, LedgerUnavailableError, RunLockedError
from ckptflow.ledger import shared_engines
from ckptflow.sqlite_url import sqlite_file
from ckptflow.ledger.fencing import Fence, LeaseGrant, held_fence, holding
from ckptflow.policy import Ckpt, best_of, metric_value
from ckptflow.schema_revision import shipped_head
from ckptflow.ledger.models import (
    Attempt,
    AttemptStatus,
    Checkpoint,
    CheckpointState,
    Export,
    Lease,
    Run,
    RunStatus,
    utcnow,
)

if TYPE_CHECKING:
    from alembic.config import Config

# Packaged Alembic config; its script_location is the `migrations/` package next to it.
ALEMBIC_INI = Path(__file__).with_name("alembic.ini")
# Directory of env.py and versions/ (a package, installed with the distribution).
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# How long a SQLite writer waits for another writer's lock before giving up (seconds).
SQLITE_BUSY_TIMEOUT_S = 30.0
# Execution option that makes the SQLite `begin` hook emit BEGIN IMMEDIATE (write sessions).
_IMMEDIATE_OPTION = "ckptflow_sqlite_immediate"
# Retries of the migration step when another process is creating the same schema.
_MIGRATE_RETRIES = 10
# A run's lease is taken over when its holder has not heartbeat for this long (seconds).
LEASE_TTL_SECONDS = 60.0
# Holders heartbeat this often: a third of the TTL or less, so one late beat never loses the lease.
LEASE_HEARTBEAT_SECONDS = LEASE_TTL_SECONDS / 4
# Holder of a released lease (the row stays, so its token keeps growing).
_NO_HOLDER = ""
# Rounds of read → compare-and-swap before take_lease gives up on a contended lease.
_LEASE_CAS_ROUNDS = 20
# Tries of one ledger call whose server connection drops, and the first pause between them
# (doubling: 0.25+0.5+1+2+4+4 s ≈ 12 s, long enough for a restart or a failover).
_DISCONNECT_TRIES = 7
_DISCONNECT_FIRST_PAUSE_S = 0.25
_DISCONNECT_MAX_PAUSE_S = 4.0
# Connection failures that waiting does not cure (a wrong URL, password or role): raised at once.
_PERMANENT_CONNECT_FAILURES = ("password authentication failed", "does not exist", "no pg_hba.conf entry")


# -- records ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRecord:
    id: int
    name: str
    status: RunStatus
    fingerprint: str
    config: dict[str, Any]
    base_model: str
    total_steps: int
    metrics: dict[str, Any]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class CheckpointRecord:
    id: int
    run_id: int
    step: int
    epoch: float | None
    path: str
    state: CheckpointState
    metrics: dict[str, Any]
    bytes: int
    manifest_sha256: str | None
    created_at: datetime
    pruned_at: datetime | None
    reason: str | None
    remote_at: datetime | None = None  # when its remote copy verified (None: no verified remote copy)


@dataclass(frozen=True)
class AttemptRecord:
    id: int
    run_id: int
    chunk: int
    attempt: int
    start_step: int
    end_step: int
    resumed_from: int | None
    resumed_from_step: int | None
    status: AttemptStatus
    error: str | None
    notes: str | None
    prefect_flow_run_id: str | None
    prefect_task_run_id: str | None
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class ExportRecord:
    id: int
    run_id: int
    checkpoint_id: int
    step: int
    path: str
    merged: bool
    metrics: dict[str, Any]
    promoted: bool
    created_at: datetime
    promoted_at: datetime | None = None
    pruned_at: datetime | None = None
    pruned_reason: str | None = None


def _run_record(r: Run) -> RunRecord:
    return RunRecord(
        id=r.id,
        name=r.name,
        status=RunStatus(r.status),
        fingerprint=r.fingerprint,
        config=dict(r.config or {}),
        base_model=r.base_model,
        total_steps=r.total_steps,
        metrics=dict(r.metrics or {}),
        created_at=r.created_at,
        updated_at=r.updated_at,
    )


def _ckpt_record(c: Checkpoint, absolute: Callable[[str], str]) -> CheckpointRecord:
    return CheckpointRecord(
        id=c.id,
        run_id=c.run_id,
        step=c.step,
        epoch=c.epoch,
        path=absolute(c.path),
        state=CheckpointState(c.state),
        metrics=dict(c.metrics or {}),
        bytes=c.bytes,
        manifest_sha256=c.manifest_sha256,
        created_at=c.created_at,
        pruned_at=c.pruned_at,
        reason=c.reason,
        remote_at=c.remote_at,
    )


def _attempt_record(a: Attempt) -> AttemptRecord:
    return AttemptRecord(
        id=a.id,
        run_id=a.run_id,
        chunk=a.chunk,
        attempt=a.attempt,
        start_step=a.start_step,
        end_step=a.end_step,
        resumed_from=a.resumed_from,
        resumed_from_step=a.resumed_from_step,
        status=AttemptStatus(a.status),
        error=a.error,
        notes=a.notes,
        prefect_flow_run_id=a.prefect_flow_run_id,
        prefect_task_run_id=a.prefect_task_run_id,
        started_at=a.started_at,
        finished_at=a.finished_at,
    )


def _export_record(e: Export, step: int, absolute: Callable[[str], str]) -> ExportRecord:
    return ExportRecord(
        id=e.id,
        run_id=e.run_id,
        checkpoint_id=e.checkpoint_id,
        step=step,
        path=absolute(e.path),
        merged=bool(e.merged),
        metrics=dict(e.metrics or {}),
        promoted=bool(e.promoted),
        created_at=e.created_at,
        promoted_at=e.promoted_at,
        pruned_at=e.pruned_at,
        pruned_reason=e.pruned_reason,
    )


# -- engine ----------------------------------------------------------------------------
def make_engine(url: str, *, readonly: bool = False, **kwargs: Any) -> Engine:
    """An engine for `url`; for SQLite with WAL, busy timeout, foreign keys and BEGIN IMMEDIATE writes.

    `readonly`: a SQLite file is opened read-only (see `preflight.readonly_sqlite_uri`); no directory
    is created and the journal mode is left alone.
    """
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(u, pool_pre_ping=True, **kwargs)
    path = sqlite_file(url)
    connect_args: dict[str, Any] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    if path is None:  # in-memory: one shared connection, or every checkout sees an empty database
        connect_args["check_same_thread"] = False
        kwargs.setdefault("poolclass", StaticPool)
    elif readonly:
        u = readonly_sqlite_url(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(u, connect_args=connect_args, **kwargs)
    wal = path is not None and not readonly

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cur.execute("PRAGMA foreign_keys = ON")
            if wal:
                _retry_locked(lambda: cur.execute("PRAGMA journal_mode = WAL"))
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        immediate = conn.get_execution_options().get(_IMMEDIATE_OPTION, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def readonly_sqlite_url(path: Path) -> Any:
    """The SQLAlchemy URL of `preflight.readonly_sqlite_uri` (pysqlite passes the URI's flags on)."""
    from ckptflow.preflight import readonly_sqlite_uri

    return make_url(f"sqlite:///{readonly_sqlite_uri(path)}&uri=true")


def _retry_locked(fn: Any, attempts: int = 50) -> Any:
    """Run fn, retrying briefly on SQLite lock errors the busy handler does not cover."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as exc:  # sqlite3.OperationalError (raw DBAPI, no SQLAlchemy wrapper here)
            if "locked" not in str(exc) or i == attempts - 1:
                raise
            time.sleep(0.05 * (i + 1))
    return None


@contextlib.contextmanager
def _dir_lock(path: Path | None) -> Iterator[None]:
    """Serialize first-time setup of one SQLite file across processes (flock on its directory)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: rely on BEGIN IMMEDIATE + retries
        fcntl = None  # type: ignore[assignment]
    if path is None or fcntl is None:
        yield
        return
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _alembic_config() -> Config:
    from alembic.config import Config

    cfg = Config(str(ALEMBIC_INI))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    return cfg


@functools.cache  # the migration scripts are files of this package: parsed once per process, not per `Ledger(...)`
def head_revision() -> str | None:
    """The newest migration shipped with this package, as Alembic reads it (schema_revision.shipped_head: without)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


# -- lost connections ------------------------------------------------------------------------
def _is_disconnect(exc: DBAPIError) -> bool:
    """The connection dropped (SQLAlchemy invalidated it) or could not be made for now (no statement ran)."""
    if exc.connection_invalidated:
        return True
    could_not_connect = isinstance(exc, OperationalError) and exc.statement is None
    return could_not_connect and not any(text in str(exc.orig) for text in _PERMANENT_CONNECT_FAILURES)


def _retried_on_disconnect(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a ledger call (one short transaction) again when its server connection drops; not on SQLite.

    Raises LedgerUnavailableError, naming the database and the last error, when every try failed.
    """

    @functools.wraps(method)
    def call(self: Ledger, *args: Any, **kwargs: Any) -> Any:
        if self._engine.dialect.name == "sqlite":  # a local file: nothing to reconnect to
            return method(self, *args, **kwargs)
        pause, started = _DISCONNECT_FIRST_PAUSE_S, time.monotonic()
        for attempt in range(1, _DISCONNECT_TRIES + 1):
            try:
                return method(self, *args, **kwargs)
            except DBAPIError as exc:
                if not _is_disconnect(exc):
                    raise
                if attempt == _DISCONNECT_TRIES:
                    raise LedgerUnavailableError(_unavailable_message(self, method.__name__, exc, started)) from exc
            time.sleep(pause)
            pause = min(pause * 2, _DISCONNECT_MAX_PAUSE_S)
        raise AssertionError("unreachable")

    return call


def _unavailable_message(ledger: Ledger, call: str, exc: DBAPIError, started: float) -> str:
    from ckptflow.secrets import mask_url

    reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else type(exc).__name__
    return (
        f"the ledger database {mask_url(ledger.url)} stayed unreachable: {call} failed {_DISCONNECT_TRIES} times "
        f"over {time.monotonic() - started:.0f}s ({reason}). Check that the database server is up and reachable "
        "from this machine, and CKPTFLOW_LEDGER_URL; what was committed before is kept, and running again resumes from it"
    )


def stored_revision(conn: Connection) -> str | None:
    """The schema revision a database holds (its alembic_version row); None: no schema yet.

    Reads the row itself, as Alembic's MigrationContext does, without importing Alembic; anything
    but one row (Alembic's business: several heads) is asked of Alembic.
    """
    if not inspect(conn).has_table("alembic_version"):
        return None
    rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    if len(rows) == 1:
        return rows[0]
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


@functools.cache  # like head_revision: fixed for the life of the process
def known_revisions() -> frozenset[str]:
    """Every migration revision shipped with this package."""
    from alembic.script import ScriptDirectory

    return frozenset(rev.revision for rev in ScriptDirectory.from_config(_alembic_config()).walk_revisions())


def check_revision(url: str, revision: str | None, *, readonly: bool) -> None:
    """Refuse a ledger this version cannot use: an unknown (newer) schema; read-only, an older one.

    Raises LedgerError naming CKPTFLOW_LEDGER_URL. `revision` None is an empty ledger.
    """
    if revision is None or revision == shipped_head():  # the usual answer, without importing Alembic
        return
    head = head_revision()
    if revision == head:
        return
    shown = _safe_url(url)
    if revision not in known_revisions():
        newer = revision.isdigit() and head is not None and head.isdigit() and int(revision) > int(head)
        why = "a newer schema than this version of ckptflow knows" if newer else "a schema revision this version of ckptflow does not know"
        raise LedgerError(
            f"ledger {shown} has {why} (alembic_version {revision!r}; this version knows up to {head!r}): "
            "upgrade ckptflow to the version that wrote it, or set CKPTFLOW_LEDGER_URL to another ledger"
        )
    if readonly:
        raise LedgerError(
            f"ledger {shown} has the older schema {revision!r} (this version needs {head!r}) and read-only commands "
            "never upgrade it: run `ckptflow run` once to upgrade it, or set CKPTFLOW_LEDGER_URL to an upgraded ledger"
        )


def _safe_url(url: str) -> str:
    """The URL with any password hidden (for messages)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(CKPTFLOW_LEDGER_URL)"


# -- the ledger --------------------------------------------------------------------------
class Ledger:
    """The SQL ledger. Open with any SQLAlchemy URL; the schema is migrated to head on open."""

    def __init__(self, url: str, *, home: Path | str | None = None, readonly: bool = False) -> None:
        """Open the ledger; a writer migrates it to head, a `readonly` one only checks the schema.

        Read-only opens write nothing (no file, no directory, no migration, no journal-mode
        change) and refuse a schema other than head (LedgerError).
        """
        self.url = url
        self.readonly = readonly
        self._sqlite_path = sqlite_file(url)
        self.home = _home_of(self._sqlite_path, home)  # paths in rows are relative to it
        # An in-memory SQLite database lives in its engine: each open gets its own (shared_engines.py).
        self._shared_engine = not (self._sqlite_path is None and make_url(url).get_backend_name() == "sqlite")
        self._engine = self._open_engine()
        self._closed = False
        self._writer_engine = self._engine.execution_options(**{_IMMEDIATE_OPTION: True})
        self._read = sessionmaker(self._engine, expire_on_commit=False)
        self._write = sessionmaker(self._writer_engine, expire_on_commit=False)
        try:
            if readonly:
                check_revision(url, self.current_revision(), readonly=True)
            else:
                self._migrate()
        except BaseException:
            self.close()
            raise

    def _open_engine(self) -> Engine:
        """This process's engine of the URL (shared_engines.py); an in-memory database gets its own."""
        if not self._shared_engine:
            return make_engine(self.url, readonly=self.readonly)
        if self._sqlite_path is not None and not self.readonly:
            self._sqlite_path.parent.mkdir(parents=True, exist_ok=True)  # removed since the engine was made?
        return shared_engines.acquire(self.url, self.readonly, lambda: make_engine(self.url, readonly=self.readonly))

    def __repr__(self) -> str:
        from ckptflow.secrets import mask_url

        return f"Ledger({mask_url(self.url)!r})"

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Give the engine back; the last open Ledger of the URL in this process closes its connections."""
        if self._closed:
            return
        self._closed = True
        if self._shared_engine:
            shared_engines.release(self.url, self.readonly, self._engine)
        else:
            self._engine.dispose()

    # -- schema ----------------------------------------------------------------------
    @_retried_on_disconnect  # also makes opening a Ledger wait out a short outage (it reads this first)
    def current_revision(self) -> str | None:
        with self._engine.connect() as conn:
            return stored_revision(conn)

    def _migrate(self) -> None:
        """Upgrade to head; safe when several processes open a fresh ledger at once."""
        with _dir_lock(self._sqlite_path):
            for i in range(_MIGRATE_RETRIES):
                try:
                    current = self.current_revision()
                    if current is not None and current == shipped_head():  # every open but the first: no Alembic
                        return
                    if current == head_revision():
                        return
                    check_revision(self.url, current, readonly=False)  # newer/unknown schema: never "upgrade" it
                    from alembic import command

                    cfg = _alembic_config()
                    with self._writer_engine.begin() as conn:  # one transaction (BEGIN IMMEDIATE on SQLite)
                        cfg.attributes["connection"] = conn
                        command.upgrade(cfg, "head")
                    return
                except (OperationalError, IntegrityError) as exc:
                    # Another process created the schema between our check and our upgrade.
                    msg = str(exc).lower()
                    transient = any(s in msg for s in ("already exists", "locked", "duplicate"))
                    if i == _MIGRATE_RETRIES - 1 or not transient:
                        raise
                    time.sleep(0.1 * (i + 1))

    # -- paths -----------------------------------------------------------------------
    def _stored(self, path: str | Path) -> str:
        """How a path is stored: relative to the home (POSIX) when inside it, else absolute."""
        if self.home is None:
            return str(path)
        resolved = _resolved(Path(path))
        if resolved == self.home or not resolved.is_relative_to(self.home):
            return str(resolved)
        return resolved.relative_to(self.home).as_posix()

    def _absolute(self, stored: str) -> str:
        """A stored path as an absolute path under the current home (absolute ones as they are)."""
        if self.home is None or Path(stored).is_absolute():
            return stored
        return str(self.home.joinpath(*PurePosixPath(stored).parts))

    # -- fencing ---------------------------------------------------------------------
    def _fence_check(self, s: Session, run_id: int, fence: Fence | None) -> None:
        """Refuse the write unless `fence` (default: the one this process holds on the run) still holds the lease.

        An UPDATE, not a SELECT: on PostgreSQL it locks the lease row until this transaction
        commits, so a take-over cannot slip in between the check and the write; on SQLite
        the transaction already holds the database's write lock (BEGIN IMMEDIATE).
        """
        fence = fence or held_fence(self.url, run_id)
        if fence is None:
            return
        if fence.run_id != run_id:
            raise ValueError(f"fence of run {fence.run_id} used for a write to run {run_id}")
        res = s.execute(
            update(Lease)
            .where(Lease.run_id == run_id, Lease.holder == fence.holder, Lease.token == fence.token)
            .values(heartbeat_at=utcnow())
        )
        if res.rowcount != 1:
            raise LeaseLostError(
                f"{fence.holder} lost the lease of run {run_id} (token {fence.token}): another process took it "
                "over, so this write was refused; the process that holds the lease now continues the run"
            )

    # -- runs ------------------------------------------------------------------------
    @_retried_on_disconnect
    def create_run(
        self, name: str, *, fingerprint: str, config: dict[str, Any], base_model: str, total_steps: int
    ) -> RunRecord:
        """A new run in status `running`. Raises ValueError if the name is taken."""
        now = utcnow()
        run = Run(
            name=name,
            status=RunStatus.RUNNING.value,
            fingerprint=fingerprint,
            config=dict(config),
            base_model=base_model,
            total_steps=total_steps,
            metrics={},
            created_at=now,
            updated_at=now,
        )
        try:
            with self._write.begin() as s:
                s.add(run)
                s.flush()
                return _run_record(run)
        except IntegrityError:
            raise ValueError(f"a run named {name!r} already exists in the ledger") from None

    @_retried_on_disconnect
    def get_run(self, name: str) -> RunRecord | None:
        with self._read() as s:
            run = s.scalar(select(Run).where(Run.name == name))
            return _run_record(run) if run else None

    @_retried_on_disconnect
    def get_run_by_id(self, run_id: int) -> RunRecord:
        """Raises KeyError if there is no such run."""
        with self._read() as s:
            return _run_record(self._run(s, run_id))

    @_retried_on_disconnect
    def list_runs(self) -> list[RunRecord]:
        """All runs, newest first."""
        with self._read() as s:
            rows = s.scalars(select(Run).order_by(Run.created_at.desc(), Run.id.desc()))
            return [_run_record(r) for r in rows]

    @_retried_on_disconnect
    def set_run_status(self, run_id: int, status: RunStatus | str, *, fence: Fence | None = None) -> None:
        status = RunStatus(status)
        with self._write.begin() as s:
            self._fence_check(s, run_id, fence)
            run = self._run(s, run_id)
            run.status = status.value
            run.updated_at = utcnow()

    @_retried_on_disconnect
    def reopen_run(self, run_id: int) -> RunRecord:
        """Mark a `failed` run `running` again, in one statement; returns the run as it is now.

        Reopening takes no lease, so it must never undo a concurrent writer's last word: a
        duplicate submission that read "running" just before the holder finished would
        otherwise set the completed run back to running, and train it a second time. A run
        that is running (trained by another process, perhaps) is left untouched.
        """
        settled = (RunStatus.COMPLETED.value, RunStatus.RUNNING.value)
        with self._write.begin() as s:
            s.execute(
                update(Run)
                .where(Run.id == run_id, Run.status.not_in(settled))
                .values(status=RunStatus.RUNNING.value, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
            return _run_record(self._run(s, run_id))

    @_retried_on_disconnect
    def update_run_metrics(self, run_id: int, metrics: dict[str, Any], *, fence: Fence | None = None) -> RunRecord:
        """Shallow-merge `metrics` into the run's metrics; returns the updated run."""
        with self._write.begin() as s:
            self._fence_check(s, run_id, fence)
            run = self._run(s, run_id)
            run.metrics = {**(run.metrics or {}), **metrics}
            run.updated_at = utcnow()
            s.flush()
            return _run_record(run)

    @_retried_on_disconnect
    def rename_run(self, run_id: int, new_name: str) -> None:
        """Raises ValueError if new_name is taken."""
        try:
            with self._write.begin() as s:
                run = self._run(s, run_id)
                run.name = new_name
                run.updated_at = utcnow()
        except IntegrityError:
            raise ValueError(f"cannot rename run {run_id}: a run named {new_name!r} already exists") from None

    def best_metrics(self, metric: str = "eval_loss", *, greater_is_better: bool = False) -> dict[int, dict[str, Any]]:
        """Per run id, a summary of its committed checkpoints, in two queries for all runs.

        Returns `{run_id: {"committed": n, "latest_step": int|None, "best_step": int|None,
        "best_value": float|None, "metric": metric}}` for every run. SQL fetches the rows; the best
        is chosen by `policy.best_of`, the one ranking retention and export use. Metrics are decoded
        in Python, not with SQL JSON functions: SQLite's reject a whole document holding a NaN (a
        diverged loss), which would fail the call.
        """
        committed = CheckpointState.COMMITTED.value
        out: dict[int, dict[str, Any]] = {}
        with self._read() as s:
            counts = s.execute(
                select(Run.id, func.count(Checkpoint.id), func.max(Checkpoint.step))
                .outerjoin(Checkpoint, (Checkpoint.run_id == Run.id) & (Checkpoint.state == committed))
                .group_by(Run.id)
            )
            for run_id, n, latest in counts:
                out[run_id] = {
                    "committed": n, "latest_step": latest, "best_step": None, "best_value": None, "metric": metric
                }
            rows = s.execute(
                select(Checkpoint.run_id, Checkpoint.step, Checkpoint.metrics)
                .where(Checkpoint.state == committed)
                .order_by(Checkpoint.run_id, Checkpoint.step)
            )
            for run_id, group in itertools.groupby(rows, key=lambda row: row[0]):
                best = best_of((Ckpt(step, metrics or {}) for _, step, metrics in group), metric, greater_is_better)
                if best is not None:
                    out[run_id]["best_step"], out[run_id]["best_value"] = best.step, metric_value(best, metric)
        return out

    # -- checkpoints ------------------------------------------------------------------
    @_retried_on_disconnect
    def begin_checkpoint(self, run_id: int, step: int, path: str, *, fence: Fence | None = None) -> CheckpointRecord:
        """Record that checkpoint `step` is being written; an existing row for that step is reset."""
        now = utcnow()
        with self._write.begin() as s:
            self._fence_check(s, run_id, fence)
            ck = self._ckpt(s, run_id, step)
            if ck is None:
                ck = Checkpoint(run_id=run_id, step=step)
                s.add(ck)
            ck.epoch, ck.path, ck.state = None, self._stored(path), CheckpointState.WRITING.value
            ck.metrics, ck.bytes, ck.manifest_sha256 = {}, 0, None
            ck.created_at, ck.pruned_at, ck.reason = now, None, None
            ck.remote_at = None  # a rewritten checkpoint has no remote copy yet
            s.flush()
            return _ckpt_record(ck, self._absolute)

    @_retried_on_disconnect
    def commit_checkpoint(
        self,
        run_id: int,
        step: int,
        *,
        epoch: float | None,
        metrics: dict[str, Any],
        bytes: int,  # noqa: A002 - the column's name
        manifest_sha256: str,
        path: str | None = None,
        fence: Fence | None = None,
    ) -> CheckpointRecord:
        """writing → committed. Creates the row if begin was skipped (then `path` is required).

        Raises LeaseLostError, committing nothing, if the fence no longer holds the run's lease.
        """
        with self._write.begin() as s:
            self._fence_check(s, run_id, fence)
            ck = self._ckpt(s, run_id, step)
            if ck is None:
                if path is None:
                    raise ValueError(f"checkpoint {step} of run {run_id} was never begun: pass its path")
                ck = Checkpoint(run_id=run_id, step=step, created_at=utcnow())
                s.add(ck)
            if path is not None:
                ck.path = self._stored(path)
            ck.epoch, ck.metrics, ck.bytes = epoch, dict(metrics), int(bytes)
            ck.state, ck.manifest_sha256 = CheckpointState.COMMITTED.value, manifest_sha256
            ck.pruned_at, ck.reason = None, None
            s.flush()
            return _ckpt_record(ck, self._absolute)

    @_retried_on_disconnect
    def mark_checkpoint(
        self,
        run_id: int,
        step: int,
        state: CheckpointState | str,
        reason: str | None = None,
        *,
        fence: Fence | None = None,
    ) -> None:
        """Set a checkpoint's state (pruned/corrupt/partial/...); `pruned` also stamps pruned_at."""
        state = CheckpointState(state)
        with self._write.begin() as s:
            self._fence_check(s, run_id, fence)
            ck = self._ckpt(s, run_id, step)
            if ck is None:
                raise KeyError(f"run {run_id} has no checkpoint at step {step}")
            ck.state, ck.reason = state.value, reason
            if state is CheckpointState.PRUNED:
                ck.pruned_at = utcnow()

    @_retried_on_disconnect
    def checkpoints(self, run_id: int, states: Iterable[CheckpointState | str] | None = None) -> list[CheckpointRecord]:
        """The run's checkpoints (optionally only those in `states`), by step ascending."""
        q = select(Checkpoint).where(Checkpoint.run_id == run_id)
        if states is not None:
            q = q.where(Checkpoint.state.in_([CheckpointState(x).value for x in states]))
        with self._read() as s:
            return [_ckpt_record(c, self._absolute) for c in s.scalars(q.order_by(Checkpoint.step))]

    @_retried_on_disconnect
    def get_checkpoint(self, run_id: int, step: int) -> CheckpointRecord | None:
        with self._read() as s:
            ck = self._ckpt(s, run_id, step)
            return _ckpt_record(ck, self._absolute) if ck else None

    @_retried_on_disconnect
    def mark_remote(
        self, run_id: int, step: int, manifest_sha256: str | None, *, fence: Fence | None = None
    ) -> bool:
        """Record that checkpoint `step` has a verified remote copy (now); None clears it (copy deleted or bad).

        With a sha256, only a row that still has that manifest is marked (a checkpoint rewritten
        since the upload keeps no stale mark). Returns whether the row was changed.
        """
        with self._write.begin() as s:
            self._fence_check(s, run_id, fence)
            ck = self._ckpt(s, run_id, step)
            if ck is None or (manifest_sha256 is not None and ck.manifest_sha256 != manifest_sha256):
                return False
            ck.remote_at = utcnow() if manifest_sha256 is not None else None
            return True

    # -- attempts ---------------------------------------------------------------------
    @_retried_on_disconnect
    def start_attempt(
        self,
        run_id: int,
        *,
        chunk: int,
        start_step: int,
        end_step: int,
        resumed_from_step: int | None,
        prefect_flow_run_id: str | None = None,
        prefect_task_run_id: str | None = None,
        fence: Fence | None = None,
    ) -> AttemptRecord:
        """A running attempt; its number is 1 + the attempts already made at (run, chunk)."""
        with self._write.begin() as s:
            self._fence_check(s, run_id, fence)
            n = s.scalar(select(func.count(Attempt.id)).where(Attempt.run_id == run_id, Attempt.chunk == chunk))
            resumed = self._ckpt(s, run_id, resumed_from_step) if resumed_from_step is not None else None
            a = Attempt(
                run_id=run_id,
                chunk=chunk,
                attempt=(n or 0) + 1,
                start_step=start_step,
                end_step=end_step,
                resumed_from=resumed.id if resumed else None,
                resumed_from_step=resumed_from_step,
                status=AttemptStatus.RUNNING.value,
                prefect_flow_run_id=_opt_str(prefect_flow_run_id),
                prefect_task_run_id=_opt_str(prefect_task_run_id),
                started_at=utcnow(),
            )
            s.add(a)
            s.flush()
            return _attempt_record(a)

    @_retried_on_disconnect
    def finish_attempt(
        self, attempt_id: int, status: AttemptStatus | str, error: str | None = None, *, fence: Fence | None = None
    ) -> None:
        status = AttemptStatus(status)
        with self._write.begin() as s:
            a = self._attempt(s, attempt_id)
            self._fence_check(s, a.run_id, fence)
            a.status, a.error, a.finished_at = status.value, error, utcnow()

    @_retried_on_disconnect
    def abandon_attempts(self, run_id: int, error: str, *, fence: Fence | None = None) -> list[AttemptRecord]:
        """Mark the run's `running` attempts failed with `error`; returns them as they were.

        Only the run's single writer (the lease holder) calls this, when it starts an
        attempt: any other attempt still `running` then belongs to a process that died.
        """
        with self._write.begin() as s:
            self._fence_check(s, run_id, fence)
            rows = list(
                s.scalars(
                    select(Attempt)
                    .where(Attempt.run_id == run_id, Attempt.status == AttemptStatus.RUNNING.value)
                    .order_by(Attempt.id)
                )
            )
            before = [_attempt_record(a) for a in rows]
            now = utcnow()
            for a in rows:
                a.status, a.error, a.finished_at = AttemptStatus.FAILED.value, error, now
            return before

    @_retried_on_disconnect
    def add_attempt_note(self, attempt_id: int, note: str, *, fence: Fence | None = None) -> None:
        """Append one line to the attempt's notes."""
        with self._write.begin() as s:
            a = self._attempt(s, attempt_id)
            self._fence_check(s, a.run_id, fence)
            a.notes = f"{a.notes}\n{note}" if a.notes else note

    @_retried_on_disconnect
    def attempts(self, run_id: int) -> list[AttemptRecord]:
        """The run's attempts in the order they started."""
        with self._read() as s:
            rows = s.scalars(select(Attempt).where(Attempt.run_id == run_id).order_by(Attempt.id))
            return [_attempt_record(a) for a in rows]

    # -- exports ----------------------------------------------------------------------
    @_retried_on_disconnect
    def record_export(
        self,
        run_id: int,
        *,
        checkpoint_id: int,
        path: str,
        merged: bool,
        metrics: dict[str, Any],
        fence: Fence | None = None,
    ) -> ExportRecord:
        """Raises KeyError if the checkpoint is not one of this run's."""
        with self._write.begin() as s:
            self._fence_check(s, run_id, fence)
            ck = s.get(Checkpoint, checkpoint_id)
            if ck is None or ck.run_id != run_id:
                raise KeyError(f"checkpoint id {checkpoint_id} is not a checkpoint of run {run_id}")
            e = Export(
                run_id=run_id,
                checkpoint_id=checkpoint_id,
                path=self._stored(path),
                merged=bool(merged),
                metrics=dict(metrics),
                promoted=False,
                created_at=utcnow(),
            )
            s.add(e)
            s.flush()
            return _export_record(e, ck.step, self._absolute)

    @_retried_on_disconnect
    def set_promoted(self, export_id: int, promoted: bool) -> None:
        with self._write.begin() as s:
            res = s.execute(update(Export).where(Export.id == export_id).values(promoted=bool(promoted)))
            if res.rowcount == 0:
                raise KeyError(f"no export with id {export_id}")

    @_retried_on_disconnect
    def promote_export(self, export_id: int, *, rollback: bool = False) -> None:
        """Make `export_id` the only promoted export, in one transaction: a crash leaves either the
        old champion or the new one promoted, never none or two.

        Un-promote first, then promote: the unique index `uq_exports_one_promoted` (checked per
        row on PostgreSQL) never sees two, and a concurrent promotion fails on it instead of
        leaving two champions. Raises KeyError (changing nothing) if there is no such export.
        """
        with self._write.begin() as s:
            if s.get(Export, export_id) is None:
                raise KeyError(f"no export with id {export_id}")
            s.execute(update(Export).where(Export.promoted.is_(True), Export.id != export_id).values(promoted=False))
            # A rollback restores an earlier champion without making it "newer" than the one it replaces.
            stamp = {} if rollback else {"promoted_at": utcnow()}
            s.execute(update(Export).where(Export.id == export_id).values(promoted=True, **stamp))

    @_retried_on_disconnect
    def mark_export_pruned(self, export_id: int, reason: str) -> None:
        """Record that export retention deleted this export's files (the row stays). Never the champion."""
        with self._write.begin() as s:
            e = s.get(Export, export_id)
            if e is None:
                raise KeyError(f"no export with id {export_id}")
            if e.promoted:
                raise ValueError(f"export {export_id} is the champion: it is never pruned")
            e.pruned_at, e.pruned_reason = utcnow(), reason

    @_retried_on_disconnect
    def exports(self, run_id: int | None = None) -> list[ExportRecord]:
        """Exports (of one run, or all), oldest first."""
        q = select(Export, Checkpoint.step).join(Checkpoint, Checkpoint.id == Export.checkpoint_id)
        if run_id is not None:
            q = q.where(Export.run_id == run_id)
        with self._read() as s:
            return [_export_record(e, step, self._absolute) for e, step in s.execute(q.order_by(Export.id))]

    # -- leases -----------------------------------------------------------------------
    @_retried_on_disconnect
    def take_lease(self, run_id: int, holder: str, *, ttl_seconds: float = LEASE_TTL_SECONDS) -> LeaseGrant:
        """Become the run's only writer, or raise RunLockedError naming the live holder.

        A lease held by someone else is taken over when its holder is gone: its pid is dead
        on this host, or it has not heartbeat for `ttl_seconds`. Re-acquiring one's own lease
        is a new acquisition too. Every acquisition increments the token, in one atomic
        statement: a compare-and-swap `UPDATE … WHERE token = <the token just read>` (or an
        INSERT under the primary key when the run never had a lease), so of two processes
        taking over the same stale lease exactly one matches a row; the other re-reads and
        finds a live holder. That holds on PostgreSQL (the loser's UPDATE waits for the
        winner's row lock, then re-checks the token) as on SQLite (BEGIN IMMEDIATE).
        """
        for _ in range(_LEASE_CAS_ROUNDS):
            now, host, pid = utcnow(), socket.gethostname(), os.getpid()
            values = {"holder": holder, "host": host, "pid": pid, "acquired_at": now, "heartbeat_at": now}
            try:
                with self._write.begin() as s:
                    run = self._run(s, run_id)
                    lease = s.scalar(select(Lease).where(Lease.run_id == run_id).execution_options(populate_existing=True))
                    if lease is None:
                        s.execute(insert(Lease).values(run_id=run_id, token=1, **values))
                        return LeaseGrant(Fence(run_id, holder, 1), None)
                    taken_over = None
                    if lease.holder not in (holder, _NO_HOLDER):
                        refusal, why = _lease_in_use(lease, run.name, now, ttl_seconds)
                        if refusal:
                            raise RunLockedError(refusal)
                        taken_over = f"{lease.holder} (host {lease.host}, pid {lease.pid}; {why})"
                    seen = lease.token
                    res = s.execute(
                        update(Lease)
                        .where(Lease.run_id == run_id, Lease.token == seen)
                        .values(token=seen + 1, **values)
                        .execution_options(synchronize_session=False)
                    )
                    if res.rowcount == 1:
                        return LeaseGrant(Fence(run_id, holder, seen + 1), taken_over)
            except IntegrityError:  # another process inserted the first lease of this run first
                pass
            time.sleep(0.01)  # lost a race: read the winner's lease and decide again
        raise RunLockedError(f"run {run_id}: could not acquire its lease, other processes kept taking it; run again")

    def acquire_lease(self, run_id: int, holder: str, *, ttl_seconds: float = LEASE_TTL_SECONDS) -> str | None:
        """`take_lease`, returning only a description of the holder taken over, if any."""
        return self.take_lease(run_id, holder, ttl_seconds=ttl_seconds).taken_over

    @_retried_on_disconnect
    def current_fence(self, run_id: int, holder: str) -> Fence:
        """The fence of `holder`'s current acquisition; raises LeaseLostError if it does not hold the lease."""
        with self._read() as s:
            lease = s.get(Lease, run_id)
        if lease is None or lease.holder != holder:
            raise LeaseLostError(
                f"{holder} does not hold the lease of run {run_id} (holder now: {lease.holder if lease else 'none'}): "
                "another process took it over or it was released"
            )
        return Fence(run_id, holder, lease.token)

    @_retried_on_disconnect
    def check_lease(self, run_id: int, *, ttl_seconds: float = LEASE_TTL_SECONDS) -> None:
        """Raise RunLockedError if a live holder has the run's lease (as take_lease would); writes nothing.

        A cheap early refusal; take_lease remains the check that counts (two processes may pass this one).
        """
        with self._read() as s:
            run = self._run(s, run_id)
            lease = s.get(Lease, run_id)
            if lease is not None and lease.holder != _NO_HOLDER:
                refusal, _ = _lease_in_use(lease, run.name, utcnow(), ttl_seconds)
                if refusal:
                    raise RunLockedError(refusal)

    @_retried_on_disconnect
    def heartbeat(self, run_id: int, holder: str, *, token: int | None = None) -> None:
        """Prove the holder is alive. Raises LeaseLostError if the lease was lost (taken over or released).

        With `token`, only that acquisition counts (a holder that lost and re-took the lease
        does not revive an older fence).
        """
        conditions = [Lease.run_id == run_id, Lease.holder == holder]
        if token is not None:
            conditions.append(Lease.token == token)
        with self._write.begin() as s:
            res = s.execute(update(Lease).where(*conditions).values(heartbeat_at=utcnow()))
            if res.rowcount == 0:
                raise LeaseLostError(
                    f"{holder} no longer holds the lease of run {run_id}: another process took it over"
                )

    @_retried_on_disconnect
    def release_lease(self, run_id: int, holder: str) -> None:
        """Give the lease up; a no-op if `holder` does not hold it. The row (and its token) stays."""
        with self._write.begin() as s:
            s.execute(
                update(Lease).where(Lease.run_id == run_id, Lease.holder == holder).values(holder=_NO_HOLDER, pid=0)
            )

    @_retried_on_disconnect
    def lease_holder(self, run_id: int) -> str | None:
        with self._read() as s:
            lease = s.get(Lease, run_id)
            return lease.holder if lease and lease.holder != _NO_HOLDER else None

    # -- helpers ----------------------------------------------------------------------
    @staticmethod
    def _run(s: Session, run_id: int) -> Run:
        run = s.get(Run, run_id)
        if run is None:
            raise KeyError(f"no run with id {run_id} in the ledger")
        return run

    @staticmethod
    def _ckpt(s: Session, run_id: int, step: int) -> Checkpoint | None:
        return s.scalar(select(Checkpoint).where(Checkpoint.run_id == run_id, Checkpoint.step == step))

    @staticmethod
    def _attempt(s: Session, attempt_id: int) -> Attempt:
        a = s.get(Attempt, attempt_id)
        if a is None:
            raise KeyError(f"no attempt with id {attempt_id} in the ledger")
        return a


def _resolved(path: Path) -> Path:
    """Absolute, `..` and symlinks resolved as far as the path exists (it need not exist)."""
    return Path(os.path.realpath(path))


def _home_of(sqlite_path: Path | None, home: Path | str | None) -> Path | None:
    """The home stored paths are relative to: the given one, else the SQLite file's directory (the default layout)."""
    if home is not None:
        return _resolved(Path(home))
    return _resolved(sqlite_path).parent if sqlite_path is not None else None


def _lease_in_use(lease: Lease, run_name: str, now: datetime, ttl_seconds: float) -> tuple[str | None, str]:
    """(refusal message if the holder is alive, else None; why it is considered gone)."""
    age = (now - lease.heartbeat_at).total_seconds()
    dead = lease.host == socket.gethostname() and not _pid_alive(lease.pid)
    if not dead and age <= ttl_seconds:
        return (
            f"run {run_name!r} is already being trained by another process: {lease.holder} "
            f"(host {lease.host}, pid {lease.pid}) holds its lease since "
            f"{lease.acquired_at:%Y-%m-%d %H:%M:%S} UTC, last heartbeat {age:.0f}s ago. "
            "Two writers on one run are never allowed: wait for it to finish, or stop that process "
            f"(its lease expires {ttl_seconds:.0f}s after its last heartbeat) and run again",
            "",
        )
    return None, "its process is gone" if dead else f"no heartbeat for {age:.0f}s"


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (zombies count as dead)."""
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


__all__ = [
    "ALEMBIC_INI",
    "LEASE_HEARTBEAT_SECONDS",
    "LEASE_TTL_SECONDS",
    "MIGRATIONS_DIR",
    "AttemptRecord",
    "CheckpointRecord",
    "ExportRecord",
    "Ledger",
    "RunRecord",
    "head_revision",
    "make_engine",
]
