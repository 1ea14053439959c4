"""Preflight: everything that can be checked without training, checked before anything is written.

`ckptflow run` calls, before it starts Prefect or writes a ledger row:
1. `check_cheap` — settings, home, ledger, data rows, config.json, memory; imports no torch,
   transformers or Prefect, so a refusal takes about as long as `ckptflow --help`;
2. `completed_run` — a completed run answers from the tokenizer's files and the ledger (no torch);
   else `check_resume` — a changed or locked run is refused, a completed one answers (loads the tokenizer);
3. `check_model` — transformers builds the model and the LoRA targets exist (imports torch/PEFT).
Read-only commands use `open_readonly_ledger`, which creates and migrates nothing.
Every refusal is a BadInputError whose message names what to change.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptflow.errors import ConfigError, HomeError, LedgerError
from ckptflow.schema_revision import shipped_head
from ckptflow.settings import Settings, env_var_for
from ckptflow.sqlite_url import plain_sqlite_url, sqlite_file

if TYPE_CHECKING:
    from ckptflow.data import SplitSizes
    from ckptflow.ledger import Ledger
    from ckptflow.modeling import ModelShape

# The first 16 bytes of every SQLite 3 database file.
SQLITE_HEADER = b"SQLite format 3\x00"
# Where Linux reports the memory a new allocation can get without swapping.
_MEMINFO = Path("/proc/meminfo")
# cgroup v2 memory limit of this process's group ("max" when unlimited).
_CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")
_CGROUP_MEMORY_CURRENT = Path("/sys/fs/cgroup/memory.current")
_GIB = 2**30
# Most optimizer steps a run may have: plan and the flow walk every step, so beyond this
# planning alone takes minutes (and no fine-tuning needs more).
MAX_TOTAL_STEPS = 10_000_000
# Most chunks a run may have: each is a Prefect task run with its own trainer start-up.
MAX_CHUNKS = 10_000
# How the ledger stores RunStatus.COMPLETED and a released lease (read here with sqlite3, without the ORM).
_COMPLETED = "completed"
_NO_HOLDER = ""


# -- settings -------------------------------------------------------------------------------


def check_finite(settings: Settings) -> None:
    """Refuse inf/NaN in any float setting (pydantic's `gt=0` lets `inf` through)."""
    for group_name in type(settings).model_fields:
        group = getattr(settings, group_name)
        if not hasattr(group, "model_dump"):
            continue
        for field, value in group.model_dump().items():
            if isinstance(value, float) and not math.isfinite(value):
                env = env_var_for((group_name, field))
                raise ConfigError(f"{group_name}.{field}={value} is not a finite number: set {env} to a finite value")


def check_scale(settings: Settings, total_steps: int) -> None:
    """Refuse a run too long to plan, or split into more chunks than Prefect tasks make sense."""
    if total_steps > MAX_TOTAL_STEPS:
        which = "CKPTFLOW_TRAIN__MAX_STEPS" if settings.train.max_steps > 0 else "CKPTFLOW_TRAIN__EPOCHS"
        raise ConfigError(
            f"the run would have {total_steps:,} optimizer steps, more than the {MAX_TOTAL_STEPS:,} ckptflow plans: "
            f"lower {which}"
        )
    chunk_steps = settings.train.chunk_steps
    if chunk_steps and math.ceil(total_steps / chunk_steps) > MAX_CHUNKS:
        raise ConfigError(
            f"chunk_steps={chunk_steps} splits {total_steps:,} steps into {math.ceil(total_steps / chunk_steps):,} chunks "
            f"(Prefect tasks), more than {MAX_CHUNKS:,}: raise CKPTFLOW_TRAIN__CHUNK_STEPS or set it to 0 (auto)"
        )


# -- home -----------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _readonly_reason(path: Path) -> str | None:
    """Why nothing can be written in the existing directory `path`, or None when it can."""
    if os.statvfs(path).f_flag & os.ST_RDONLY:  # root may write anywhere except here
        return "it is on a read-only filesystem"
    if not os.access(path, os.W_OK | os.X_OK):
        return "this user may not write to it"
    return None


def check_home(home: Path, *, writable: bool) -> None:
    """Refuse a CKPTFLOW_HOME that is a file (or below one), and, when `writable`, one ckptflow cannot write.

    Creates nothing: a missing home is fine when its nearest existing parent is a writable directory.
    """
    if home.exists() and not home.is_dir():
        raise HomeError(f"CKPTFLOW_HOME={home} is a file, not a directory: set CKPTFLOW_HOME to a directory")
    existing = _nearest_existing(home)
    if not existing.is_dir():
        raise HomeError(
            f"CKPTFLOW_HOME={home} cannot be created: {existing} is a file: set CKPTFLOW_HOME to a directory path"
        )
    if writable:
        reason = _readonly_reason(existing)
        if reason is not None:
            where = "" if existing == home else f" (its parent {existing} must be, to create it)"
            raise HomeError(
                f"CKPTFLOW_HOME={home} is not writable{where}: {reason}; set CKPTFLOW_HOME to a writable directory "
                "(read-only commands — runs, checkpoints, verify, plan, prune --dry-run — still work on it)"
            )


# -- ledger ---------------------------------------------------------------------------------


def check_ledger(url: str) -> str | None:
    """Reachable, right driver, a database, a schema this version can use; returns its revision.

    None when there is no ledger yet (a SQLite file that does not exist or holds no schema).
    Opens everything read-only. Raises LedgerError naming CKPTFLOW_LEDGER_URL.
    """
    if plain_sqlite_url(url):  # stdlib sqlite3: no driver to check, no SQLAlchemy to import
        revision = _sqlite_revision(url)
    else:
        dialect_url = _parse_url(url)
        _check_driver(url, dialect_url)
        revision = _sqlite_revision(url) if dialect_url.get_backend_name() == "sqlite" else _server_revision(url)
    if revision is not None and revision != shipped_head():  # Alembic (~0.1 s) only when it has something to say
        from ckptflow.ledger.store import check_revision

        check_revision(url, revision, readonly=False)
    return revision


def _parse_url(url: str) -> Any:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url)
    except (ArgumentError, ValueError) as exc:
        shown = re.sub(r"(://)[^@/]*@", r"\1***@", url)  # never echo a password
        raise LedgerError(
            f"CKPTFLOW_LEDGER_URL={shown!r} is not a SQLAlchemy URL ({exc}): set it to e.g. "
            "sqlite:////abs/path/ledger.db or postgresql+psycopg://user@host/db, or unset it for $CKPTFLOW_HOME/ledger.db"
        ) from None


def _check_driver(url: str, parsed: Any) -> None:
    from sqlalchemy.exc import NoSuchModuleError

    shown = parsed.render_as_string(hide_password=True)
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise LedgerError(
            f"CKPTFLOW_LEDGER_URL={shown}: SQLAlchemy knows no database {parsed.drivername!r}: "
            "set CKPTFLOW_LEDGER_URL to a sqlite:/// or postgresql+psycopg:// URL"
        ) from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        hint = "pip install 'ckptflow[postgres]' and use postgresql+psycopg://" if parsed.get_backend_name() == "postgresql" else f"install the {parsed.drivername} driver"
        raise LedgerError(
            f"CKPTFLOW_LEDGER_URL={shown} needs the Python driver {exc.name or parsed.drivername!r}, which is not installed: "
            f"{hint}, or set CKPTFLOW_LEDGER_URL to another database"
        ) from None


def readonly_sqlite_uri(path: Path) -> str:
    """The sqlite3 URI that opens `path` read-only.

    On a read-only filesystem SQLite cannot create the WAL index it needs, so the file is
    opened `immutable` (nobody can change it there) — unless a non-empty WAL holds committed
    transactions that immutable would ignore; then `mode=ro`, which reads them when the index exists.
    """
    from urllib.parse import quote

    wal = path.with_name(path.name + "-wal")
    pending = wal.is_file() and wal.stat().st_size > 0
    flag = "immutable=1" if os.statvfs(path.parent).f_flag & os.ST_RDONLY and not pending else "mode=ro"
    return f"file:{quote(str(path.resolve()))}?{flag}"


def _sqlite_revision(url: str) -> str | None:
    """The alembic revision of a SQLite ledger file, read without writing (None: no ledger yet)."""
    import sqlite3

    path = sqlite_file(url)
    if path is None or not path.exists():
        return None
    if path.is_dir():
        raise LedgerError(f"the ledger {path} is a directory, not a SQLite file: remove it or set CKPTFLOW_LEDGER_URL")
    try:
        with path.open("rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
    except OSError as exc:
        raise LedgerError(f"cannot read the ledger {path} ({exc.strerror}): fix its permissions or set CKPTFLOW_LEDGER_URL") from None
    if not header:
        return None  # an empty file is an empty SQLite database
    if header != SQLITE_HEADER:
        raise LedgerError(
            f"{path} is not a SQLite database (it starts with {header[:16]!r}): move it away, "
            "or set CKPTFLOW_LEDGER_URL (or CKPTFLOW_HOME) to another ledger"
        )
    uri = readonly_sqlite_uri(path)
    try:
        con = sqlite3.connect(uri, uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "alembic_version" not in tables:
                if tables:
                    raise LedgerError(
                        f"{path} is a SQLite database but not a ckptflow ledger (tables: {', '.join(sorted(tables))}): "
                        "move it away or set CKPTFLOW_LEDGER_URL to another file"
                    )
                return None
            rows = [r[0] for r in con.execute("SELECT version_num FROM alembic_version")]
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path} is not a readable SQLite database ({exc}): move it away or set CKPTFLOW_LEDGER_URL") from None
    if len(rows) != 1:
        raise LedgerError(f"{path} has {len(rows)} alembic_version rows (expected 1): not a ledger this version can use; set CKPTFLOW_LEDGER_URL")
    return rows[0]


def _server_revision(url: str) -> str | None:
    from sqlalchemy import create_engine, pool

    from ckptflow.ledger.store import stored_revision

    engine = create_engine(url, poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            return stored_revision(conn)
    except Exception as exc:  # OperationalError: refused, unknown host, auth; anything the driver raises
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LedgerError(
            f"cannot reach the ledger at {engine.url.render_as_string(hide_password=True)} ({first}): "
            "start the database or fix CKPTFLOW_LEDGER_URL"
        ) from None
    finally:
        engine.dispose()


def ledger_exists(settings: Settings) -> bool:
    """False for a SQLite ledger whose file is missing or empty (nothing recorded yet); servers always exist."""
    path = sqlite_file(settings.ledger)
    if path is None:
        return True
    return path.is_file() and path.stat().st_size > 0


def open_readonly_ledger(settings: Settings) -> Ledger | None:
    """The ledger opened read-only after the checks, or None when nothing was recorded yet.

    Creates nothing and never migrates: for `runs`, `checkpoints`, `verify`, `prune --dry-run`.
    """
    check_home(settings.home, writable=False)
    _check_driver(settings.ledger, _parse_url(settings.ledger))  # a bad URL says so, not "no runs yet"
    if not ledger_exists(settings) or check_ledger(settings.ledger) is None:
        return None
    from ckptflow.ledger import Ledger

    return Ledger(settings.ledger, home=settings.home, readonly=True)


# -- memory ---------------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes a training step can allocate: MemAvailable, capped by the cgroup limit (None if unknown)."""
    available: int | None = None
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    try:
        limit = _CGROUP_MEMORY_MAX.read_text().strip()
        if limit != "max" and available is not None:
            used = int(_CGROUP_MEMORY_CURRENT.read_text().strip())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def check_memory(settings: Settings, shape: ModelShape, sizes: SplitSizes) -> None:
    """Refuse a batch whose estimated step memory exceeds the RAM available now, with the numbers."""
    from ckptflow.modeling import estimate_training_memory

    available = available_memory()
    if available is None:
        return
    rows = max(sizes.train_rows, sizes.eval_rows)

    def estimate(batch_size: int):
        return estimate_training_memory(shape, batch_size=batch_size, rows=rows, max_length=settings.model.max_length)

    need = estimate(settings.train.batch_size)
    if need.total <= available:
        return
    lo, hi = 0, settings.train.batch_size
    while lo < hi:  # the largest batch_size that fits: the estimate grows with it
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if estimate(mid).total <= available else (lo, mid - 1)
    raise ConfigError(
        f"batch_size={settings.train.batch_size} would need ~{need.total / _GIB:.1f} GiB of RAM "
        f"(batch of {need.batch} × {need.seq} tokens: activations {need.activations / _GIB:.1f} GiB, "
        f"logits {need.logits / _GIB:.1f} GiB over a {shape.vocab}-token vocabulary, "
        f"weights {need.weights / _GIB:.2f} GiB, batch index lists {need.sampler / _GIB:.1f} GiB), "
        f"but only {available / _GIB:.1f} GiB is available: set CKPTFLOW_TRAIN__BATCH_SIZE to at most {min(lo, rows)} "
        f"(the data has {rows} rows: a larger batch_size changes nothing but memory; "
        "CKPTFLOW_TRAIN__GRADIENT_ACCUMULATION_STEPS gives a larger effective batch) or lower CKPTFLOW_MODEL__MAX_LENGTH"
    )


# -- the whole preflight of `ckptflow run` ----------------------------------------------------


def check_cheap(settings: Settings) -> None:
    """Settings, home, ledger, data rows, config.json and memory: no torch, transformers or Prefect, nothing written."""
    from ckptflow.data import check_split, split_sizes
    from ckptflow.modeling import model_shape
    from ckptflow.runs import total_steps

    check_finite(settings)
    check_home(settings.home, writable=True)
    _check_ledger_dir(settings)
    check_ledger(settings.ledger)
    sizes = split_sizes(settings.data, settings.train.seed)
    check_split(settings.data, sizes, evaluates=settings.checkpoint.evaluates)
    check_scale(settings, total_steps(settings, sizes.train_rows))
    check_memory(settings, model_shape(settings.model.name_or_path, settings.home), sizes)


def check_model(settings: Settings) -> None:
    """transformers can build the model from its config, the LoRA targets exist, this machine can train in
    the run's precision (imports torch/PEFT)."""
    from ckptflow.modeling import check_lora_targets, model_config
    from ckptflow.precision import check_supported

    check_lora_targets(model_config(settings.model.name_or_path, settings.home), settings.model)
    check_supported(settings.train.precision)


def completed_run(settings: Settings, run_name: str | None, new: bool) -> str | None:
    """The name of the completed run `ckptflow run` would resume, answered without transformers, torch or Prefect.

    The data fingerprint comes from the tokenizer's files (`tokenizer_files`): a guess that counts
    only when the ledger recorded exactly it for a completed run no process holds. None means "not
    sure": the caller runs `check_resume`, which loads the tokenizer, decides and refuses.
    """
    if new or not ledger_exists(settings):
        return None
    from ckptflow.data import fingerprint_of
    from ckptflow.modeling import resolve_model
    from ckptflow.runs import default_run_name, run_fingerprint
    from ckptflow.tokenizer_files import identity_from_files

    tokenizer_id = identity_from_files(resolve_model(settings.model.name_or_path, settings.home).path)
    if tokenizer_id is None:
        return None
    fingerprint = fingerprint_of(
        settings.data, tokenizer_id=tokenizer_id, max_length=settings.model.max_length, seed=settings.train.seed
    )
    name = run_name or default_run_name(settings, fingerprint)
    recorded = _recorded_run(settings, name)
    if recorded is None:
        return None
    recorded_fingerprint, status, holder = recorded
    if status != _COMPLETED or holder != _NO_HOLDER or recorded_fingerprint != run_fingerprint(settings, fingerprint):
        return None  # not finished, held by a process, or not provably the same run: check_resume decides
    return name


def _recorded_run(settings: Settings, name: str) -> tuple[str, str, str] | None:
    """(run fingerprint, status, lease holder) of run `name` as recorded; None when there is no such run.

    A SQLite ledger is read with sqlite3 (no SQLAlchemy ORM or Alembic import); a server through the Ledger.
    """
    path = sqlite_file(settings.ledger)
    if path is None:
        return _recorded_run_on_server(settings, name)
    import sqlite3

    try:
        con = sqlite3.connect(readonly_sqlite_uri(path), uri=True)
        try:
            row = con.execute(
                "SELECT runs.fingerprint, runs.status, COALESCE(leases.holder, ?) FROM runs "
                "LEFT JOIN leases ON leases.run_id = runs.id WHERE runs.name = ?",
                (_NO_HOLDER, name),
            ).fetchone()
        finally:
            con.close()
    except sqlite3.Error:  # an older schema, a lock: not sure, the full check reads it through the Ledger
        return None
    return tuple(row) if row is not None else None


def _recorded_run_on_server(settings: Settings, name: str) -> tuple[str, str, str] | None:
    from ckptflow.errors import BadInputError

    ledger = open_readonly_ledger(settings)
    if ledger is None:
        return None
    try:
        run = ledger.get_run(name)
        if run is None:
            return None
        try:
            ledger.check_lease(run.id)
        except BadInputError:  # held by a live process
            return run.fingerprint, str(run.status), "(held)"
        return run.fingerprint, str(run.status), _NO_HOLDER
    finally:
        ledger.close()


def check_resume(settings: Settings, run_name: str | None, new: bool) -> str | None:
    """Refuse resuming with changed settings/data or a run being trained; the name of a completed run, else None.

    Reads the data and the tokenizer for the data fingerprint but tokenizes and caches nothing.
    Without a ledger nothing was recorded yet: nothing to refuse.
    """
    if not ledger_exists(settings):
        return None
    from ckptflow.data import fingerprint_only
    from ckptflow.ledger import Ledger, RunStatus
    from ckptflow.modeling import load_tokenizer, resolve_model
    from ckptflow.runs import default_run_name, refuse_early

    tokenizer = load_tokenizer(resolve_model(settings.model.name_or_path, settings.home))
    fingerprint = fingerprint_only(
        settings.data, tokenizer=tokenizer, max_length=settings.model.max_length, seed=settings.train.seed
    )
    with Ledger(settings.ledger, home=settings.home) as ledger:
        refuse_early(ledger, settings, data_fingerprint=fingerprint, run_name=run_name, new=new)
        existing = None if new else ledger.get_run(run_name or default_run_name(settings, fingerprint))
    if existing is not None and existing.status == RunStatus.COMPLETED:
        return existing.name
    return None


def _check_ledger_dir(settings: Settings) -> None:
    """A SQLite ledger outside the home needs a writable directory too."""
    try:
        path = sqlite_file(settings.ledger)
    except Exception:  # a bad URL: check_ledger says what is wrong
        return
    if path is None or path.exists():
        return
    existing = _nearest_existing(path.parent)
    reason = _readonly_reason(existing) if existing.is_dir() else f"{existing} is a file"
    if reason is not None:
        raise LedgerError(
            f"the ledger {path} cannot be created ({reason}): set CKPTFLOW_LEDGER_URL to a writable location"
        )
