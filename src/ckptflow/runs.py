"""Open a run in the ledger: create it, or reopen it when config and data are unchanged."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ckptflow.errors import FingerprintMismatchError, RunNotFoundError
from ckptflow.paths import validate_run_name
from ckptflow.secrets import mask_url
from ckptflow.settings import (
    PRECISION_KEYS,
    WORLD_SIZE_KEY,
    Settings,
    describe_precision_change,
    env_var_for,
    settings_from_json,
    steps_per_epoch,
)

if TYPE_CHECKING:  # the ledger (SQLAlchemy ORM) is imported where used: fast answers need only fingerprints
    from ckptflow.ledger import Ledger, RunRecord

# Keys of runs.config (JSON).
CONFIG_SETTINGS = "settings"
CONFIG_DATA_FINGERPRINT = "data_fingerprint"


@dataclass(frozen=True)
class OpenedRun:
    run: RunRecord
    created: bool

    @property
    def completed(self) -> bool:
        from ckptflow.ledger import RunStatus

        return self.run.status == RunStatus.COMPLETED


def total_steps(settings: Settings, train_rows: int) -> int:
    """Optimizer steps of the whole run, fixed up front (as HF derives max_steps from epochs, global batch)."""
    if settings.train.max_steps > 0:
        return settings.train.max_steps
    tr = settings.train
    per_epoch = steps_per_epoch(train_rows, tr.batch_size, tr.gradient_accumulation_steps, tr.world_size)
    return max(1, math.ceil(tr.epochs * per_epoch))


def run_fingerprint(settings: Settings, data_fingerprint: str) -> str:
    return hashlib.sha256(f"{settings.training_fingerprint()}:{data_fingerprint}".encode()).hexdigest()


def default_run_name(settings: Settings, data_fingerprint: str) -> str:
    """Same config + data → same name, so running again resumes instead of starting over."""
    return f"run-{run_fingerprint(settings, data_fingerprint)[:10]}"


def run_settings(run: RunRecord) -> Settings:
    return settings_from_json(run.config[CONFIG_SETTINGS])


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def describe_difference(old: RunRecord, settings: Settings, data_fingerprint: str) -> str:
    """What changed between a recorded run and the requested one, one line per setting that shapes the weights.

    Settings outside the fingerprint (retries, launcher, retention, home, ...) may differ freely
    and are not listed.
    """
    try:
        before = _flatten(run_settings(old).fingerprint_inputs())
    except ValueError:  # recorded by a version whose settings no longer validate
        before = {}
    after = _flatten(settings.fingerprint_inputs())
    for flat in (before, after):  # recorded only when > 1 (see Settings.fingerprint_inputs)
        flat.setdefault(_WORLD_SIZE, 1)
    keys = sorted((set(before) | set(after)) - set(_PRECISION))
    lines = [
        f"  {k}: {before.get(k)!r} -> {after.get(k)!r} ({_env_name(k)})" for k in keys if before.get(k) != after.get(k)
    ]
    precision = describe_precision_change(*({k: flat.get(f"train.{k}") for k in PRECISION_KEYS} for flat in (before, after)))
    lines += [precision] if precision else []
    old_data = old.config.get(CONFIG_DATA_FINGERPRINT)
    if old_data != data_fingerprint:
        lines.append(f"  data fingerprint: {str(old_data)[:12]} -> {data_fingerprint[:12]} (data or tokenizer changed)")
    return "\n".join(lines) or "  (fingerprint algorithm changed)"


_PRECISION = [f"train.{k}" for k in PRECISION_KEYS]  # one line for both (settings.describe_precision_change)
# The world size is no setting of its own: it comes from these two.
_WORLD_SIZE = f"train.{WORLD_SIZE_KEY}"
_WORLD_SIZE_SOURCES = "CKPTFLOW_TRAIN__NPROC_PER_NODE with CKPTFLOW_TRAIN__LAUNCHER=torchrun; else 1"


def _env_name(dotted: str) -> str:
    if dotted == _WORLD_SIZE:
        return _WORLD_SIZE_SOURCES
    return env_var_for(tuple(dotted.split(".")))


def _free_name(ledger: Ledger, name: str) -> str:
    k = 2
    while ledger.get_run(f"{name}-{k}") is not None:
        k += 1
    return f"{name}-{k}"


def open_run(
    ledger: Ledger,
    settings: Settings,
    *,
    data_fingerprint: str,
    train_rows: int,
    run_name: str | None = None,
    new: bool = False,
) -> OpenedRun:
    """Create the run, or reopen the existing one of that name.

    Raises FingerprintMismatchError (exit 2) when the existing run was made with other
    settings or data and `new` is not set; with `new`, the fresh run is named `<name>-<k>`.
    """
    name = validate_run_name(run_name) if run_name is not None else default_run_name(settings, data_fingerprint)
    fingerprint = run_fingerprint(settings, data_fingerprint)
    existing = ledger.get_run(name)
    if existing is not None and new:
        name, existing = validate_run_name(_free_name(ledger, name), option="--run-name (--new appends -<k>)"), None
    if existing is not None:
        _refuse_changed(existing, settings, data_fingerprint)
        return OpenedRun(existing, created=False)
    # Not where the home or ledger is: a moved home must not be located through the recorded settings.
    recorded = {k: v for k, v in settings.to_json().items() if k not in ("home", "ledger_url")}
    config = {CONFIG_SETTINGS: recorded, CONFIG_DATA_FINGERPRINT: data_fingerprint}
    try:
        run = ledger.create_run(
            name,
            fingerprint=fingerprint,
            config=config,
            base_model=settings.model.name_or_path,
            total_steps=total_steps(settings, train_rows),
        )
    except ValueError:  # the same name submitted twice at once: the other submission created it first
        existing = ledger.get_run(name)
        if existing is None or new:
            raise
        _refuse_changed(existing, settings, data_fingerprint)
        return OpenedRun(existing, created=False)
    return OpenedRun(run, created=True)


def _refuse_changed(existing: RunRecord, settings: Settings, data_fingerprint: str) -> None:
    if existing.fingerprint != run_fingerprint(settings, data_fingerprint):
        raise FingerprintMismatchError(
            f"run {existing.name!r} was recorded with different settings or data:\n"
            f"{describe_difference(existing, settings, data_fingerprint)}\n"
            f"resume it with its original settings, or pass --new to start a fresh run"
        )


def refuse_early(ledger: Ledger, settings: Settings, *, data_fingerprint: str, run_name: str | None, new: bool) -> None:
    """What `open_run` and the run's lease would refuse, checked without writing anything.

    For the CLI, before it starts Prefect: resuming with changed settings or data
    (FingerprintMismatchError) and a run another live process is training (RunLockedError)
    fail at once with exit 2. `open_run` and `hold_lease` in the flow remain the checks that
    count (two processes may both pass this one).
    """
    if new:
        return
    existing = ledger.get_run(run_name or default_run_name(settings, data_fingerprint))
    if existing is not None:
        _refuse_changed(existing, settings, data_fingerprint)
        ledger.check_lease(existing.id)


def get_run(ledger: Ledger, name: str) -> RunRecord:
    run = ledger.get_run(name)
    if run is None:
        known = ", ".join(r.name for r in ledger.list_runs()[:10]) or "none yet"
        where = mask_url(ledger.url)  # a team ledger's URL carries a password
        raise RunNotFoundError(f"no run named {name!r} in {where} (runs: {known}); see `ckptflow runs`")
    return run
