"""Export a checkpoint as a model plain `transformers` can load, atomically, and check the result.

Steps: (0) refuse a target that is not ckptflow's to replace (`check_export_target`);
(1) merge LoRA into a fresh base (or keep the adapter); (2) write safetensors, tokenizer,
model card and provenance into a marked temp dir beside the target, with the modes the
umask gives; (3) reload it and compare logits with the in-memory model; (4) swap it into
place with renames.

Deletes only what ckptflow wrote: a temp dir holding its marker file, an earlier export
holding its provenance file, or an empty directory it replaced.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptflow import faults
from ckptflow.errors import BadInputError, CkptflowError
from ckptflow.paths import BUILTIN_DIR, DATA_CACHE_DIR, EXPORTS_DIR, PREFECT_RESULTS_DIR, RUNS_DIR, contained, is_within

if TYPE_CHECKING:  # the ledger (SQLAlchemy) is not imported to refuse a bad --out
    from ckptflow.ledger import CheckpointRecord, RunRecord
    from ckptflow.settings import Settings

log = logging.getLogger(__name__)

# How an export names a local model or data path: its last component only.
LOCAL_MODEL_PREFIX = "local:"
# PEFT's adapter config, whose base_model_name_or_path is the base model's local path.
ADAPTER_CONFIG = "adapter_config.json"
# Files ckptflow adds to an export.
CARD_NAME = "README.md"
PROVENANCE_NAME = "ckptflow-provenance.json"
# Written first into an export's temp dir, removed just before the swap: whatever holds it
# is ckptflow's half-written export, safe to delete.
TEMP_MARKER_NAME = ".ckptflow-export-in-progress"
# Sample text whose logits must match between the in-memory and the reloaded model.
CHECK_TEXT = "Checkpoints enable training recovery"
# Reloaded logits may differ from the in-memory model by at most this much (merged fp32 weights round-trip exactly).
LOGITS_ATOL = 1e-5


@dataclass(frozen=True)
class ExportResult:
    path: Path
    step: int
    merged: bool
    max_logit_diff: float
    seconds: float


def portable_name(name_or_path: str) -> str:
    """A model or data reference as it may leave the machine: built-in names and hub ids as they are,
    a local path as `local:<last component>` (no absolute paths of the training machine)."""
    if not name_or_path or name_or_path.startswith("builtin:"):
        return name_or_path
    path = Path(name_or_path)
    if path.is_absolute() or name_or_path.startswith(".") or path.exists():
        return f"{LOCAL_MODEL_PREFIX}{path.name}"
    return name_or_path  # a hub id such as `gpt2` or `org/name`


def _portable_adapter_config(path: Path, base_model: str) -> None:
    """PEFT records the base model's local path in an adapter export; keep only its portable name."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = portable_name(base_model)
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def training_description(run: RunRecord) -> dict[str, Any]:
    """The settings that shaped the weights (what the run fingerprint hashes), with local paths reduced to names.

    Never the home, the ledger URL or anything else about where the run was trained."""
    from ckptflow.runs import run_settings

    try:
        inputs = run_settings(run).fingerprint_inputs()
    except ValueError:  # recorded by an older version whose settings no longer validate
        return {}
    inputs["model"]["name_or_path"] = portable_name(inputs["model"]["name_or_path"])
    for key in ("train", "eval"):
        inputs["data"][key] = portable_name(inputs["data"].get(key) or "")
    return inputs


def _model_card(run: RunRecord, ckpt: CheckpointRecord, merged: bool, metrics: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items()))
    kind = "LoRA merged into the base weights" if merged else "LoRA adapter (load with PEFT on the base model)"
    return (
        f"# {run.name}\n\n"
        f"Fine-tuned with ckptflow (TRL SFTTrainer + PEFT LoRA): {kind}.\n\n"
        f"- base model: `{portable_name(run.base_model)}`\n"
        f"- run: `{run.name}` (ledger id {run.id})\n"
        f"- checkpoint: step {ckpt.step} of {run.total_steps}\n"
        f"- data fingerprint: `{run.config.get('data_fingerprint', '')}`\n"
        f"- run fingerprint: `{run.fingerprint}`\n"
        f"- checkpoint manifest sha256: `{ckpt.manifest_sha256}`\n\n"
        f"## Metrics\n\n| metric | value |\n|---|---|\n{rows}\n\n"
        f"## Load\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained(\"<this directory>\")\n"
        f"tokenizer = AutoTokenizer.from_pretrained(\"<this directory>\")\n```\n"
    )


def _logits(model: Any, tokenizer: Any):
    import torch

    inputs = tokenizer(CHECK_TEXT, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits.float()


def _reload(path: Path, merged: bool, base_loader) -> Any:
    if merged:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    from peft import PeftModel

    return PeftModel.from_pretrained(base_loader(), str(path))


# renameat2(2) flag: atomically exchange two paths (Linux >= 3.15).
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing directories; False where the OS cannot."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ExportTargetError(BadInputError):
    """An export target ckptflow may not write to or replace (exit 2)."""


def check_export_target(target: Path, *, home: Path, ledger_file: Path | None, explicit: bool, force: bool) -> Path:
    """The resolved target if ckptflow may write an export there; else ExportTargetError saying what to change.

    Refused: a non-directory; anything inside the home's runs/ (or its other own trees:
    builtin/, data-cache/, prefect-results/, exports/ itself); the home, or a directory
    containing it or the ledger file; a non-empty directory without a provenance file (not an
    earlier ckptflow export); an earlier export at an explicit --out without `force`.
    """
    shown = f"--out {target}" if explicit else f"the export directory {target}"
    fix = "choose another --out DIR" if explicit else "move it away or pass --out DIR"
    real = Path(target).resolve()
    home = Path(home)
    owned = [home / d for d in (RUNS_DIR, BUILTIN_DIR, DATA_CACHE_DIR, PREFECT_RESULTS_DIR)]
    for root in owned:
        if is_within(real, root):
            raise ExportTargetError(f"{shown} is inside {root.resolve()}, which ckptflow manages: {fix} outside it")
    for inner in [home, *owned, *([ledger_file] if ledger_file else [])]:
        if is_within(inner, real):
            raise ExportTargetError(f"{shown} contains {Path(inner).resolve()} (ckptflow's home or ledger): {fix}")
    if real == (home / EXPORTS_DIR).resolve():
        raise ExportTargetError(f"{shown} is the directory holding every run's export: {fix}, e.g. {real}/<name>")
    if real.exists() and not real.is_dir():
        raise ExportTargetError(f"{shown} is a file, not a directory: {fix} (a new or empty directory)")
    if real.is_dir() and any(real.iterdir()):
        if not _is_export(real):
            raise ExportTargetError(
                f"{shown} is a non-empty directory that ckptflow did not write (no {PROVENANCE_NAME}); "
                f"ckptflow never replaces it: {fix} (a new or empty directory)"
            )
        if explicit and not force:
            raise ExportTargetError(f"{shown} holds an earlier ckptflow export: pass --force to replace it, or {fix}")
    return real


def export_target(settings: Settings, run_name: str, *, out: Path | None, force: bool = False) -> Path:
    """Where an export of `run_name` goes (`out`, else exports/<run>), once `check_export_target` allows it."""
    target = out if out is not None else settings.export_dir(run_name)
    return check_export_target(
        target, home=settings.home, ledger_file=_ledger_file(settings.ledger), explicit=out is not None, force=force
    )


def _ledger_file(ledger_url: str) -> Path | None:
    """The SQLite ledger's file (None for a server database, or a URL that opening the ledger will report)."""
    from sqlalchemy.exc import ArgumentError

    from ckptflow.sqlite_url import sqlite_file

    try:
        return sqlite_file(ledger_url)
    except ArgumentError:
        return None


def _is_export(path: Path) -> bool:
    return (path / PROVENANCE_NAME).is_file()


def _is_ours(path: Path, *, allow_empty: bool = False) -> bool:
    """A directory ckptflow wrote: a marked temp dir or an earlier export; with `allow_empty`, also an
    empty one (the empty --out an export just replaced: nothing to lose)."""
    if not path.is_dir() or path.is_symlink():
        return False
    return (path / TEMP_MARKER_NAME).is_file() or _is_export(path) or (allow_empty and not any(path.iterdir()))


def _remove_ours(path: Path, *, allow_empty: bool = False) -> None:
    """Delete `path` only if ckptflow wrote it (see `_is_ours`); anything else is left where it is, with a warning."""
    if not path.exists() and not path.is_symlink():
        return
    if not _is_ours(path, allow_empty=allow_empty):
        log.warning("not deleting %s: ckptflow did not write it", path)
        return
    shutil.rmtree(path, ignore_errors=True)


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Put tmp at target. Where the OS can, one atomic exchange: target is never missing, not even
    for an instant; else the old target is renamed aside first (recovered by `_recover_interrupted`).
    The displaced directory (an earlier export, or an empty one) is deleted only if it is ckptflow's."""
    if target.exists() and _exchange(tmp, target):
        _fsync_dir(target.parent)
        _remove_ours(tmp, allow_empty=True)  # now holds the previous export (or the empty --out)
        return
    old = contained(target.parent, f".{target.name}.old-{uuid.uuid4().hex[:8]}-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    _remove_ours(old, allow_empty=True)


def _recover_interrupted(target: Path) -> None:
    """Undo what a killed export left beside `target`: restore a previous export that was moved
    aside but not replaced, and delete temp dirs (half-written exports, or old ones after a swap).
    Only directories ckptflow marked (temp marker or provenance file) are touched."""
    def leftovers(kind: str) -> list[Path]:
        found = target.parent.glob(f".{target.name}.{kind}-*")
        return sorted((p for p in found if not _owner_alive(p) and _is_ours(p)), key=lambda p: p.stat().st_mtime)

    olds = leftovers("old")
    if olds and not target.exists() and _is_export(olds[-1]):
        os.replace(olds.pop(), target)
    for leftover in [*olds, *leftovers("tmp")]:
        _remove_ours(leftover)


def _owner_alive(path: Path) -> bool:
    """Whether the process that named `path` (`...-<pid>`) is another live process (a concurrent export)."""
    import psutil

    pid = path.name.rsplit("-", 1)[-1]
    return pid.isdigit() and int(pid) != os.getpid() and psutil.pid_exists(int(pid))


def _make_temp_dir(target: Path) -> Path:
    """A new, marked temp dir beside `target` (the marker goes in before anything else)."""
    tmp = contained(target.parent, f".{target.name}.tmp-{uuid.uuid4().hex[:8]}-{os.getpid()}")
    tmp.mkdir()  # exclusive: never reuses a directory someone else made
    (tmp / TEMP_MARKER_NAME).write_text("ckptflow export in progress; deleted with its directory if interrupted\n")
    return tmp


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask both sets and gets)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normalize_modes(root: Path) -> None:
    """Give every file and directory the mode the umask gives a new one.

    safetensors writes through a private temp file (mode 0600) that it renames into place,
    so `model.safetensors` would otherwise be the one file other users cannot read.
    """
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def export_checkpoint(
    *,
    run: RunRecord,
    checkpoint: CheckpointRecord,
    out_dir: Path,
    merge: bool,
    base_loader,
    tokenizer: Any,
    metrics: dict[str, Any],
    notes: list[str] | None = None,
) -> ExportResult:
    """Write `checkpoint` of `run` to `out_dir` (see module docstring); raises CkptflowError if the reload check fails.

    The caller has checked `out_dir` with `check_export_target`.
    """
    from peft import PeftModel

    t0 = time.monotonic()
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted(out_dir)
    model = PeftModel.from_pretrained(base_loader(), checkpoint.path)
    if merge:
        model = model.merge_and_unload()
    tmp = _make_temp_dir(out_dir)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _portable_adapter_config(tmp / ADAPTER_CONFIG, run.base_model)
        (tmp / CARD_NAME).write_text(_model_card(run, checkpoint, merge, metrics))
        provenance = {
            "run": run.name,
            "run_id": run.id,
            "base_model": portable_name(run.base_model),
            "step": checkpoint.step,
            "total_steps": run.total_steps,
            "checkpoint": Path(checkpoint.path).name,  # checkpoint-<step>: nothing about the training machine
            "manifest_sha256": checkpoint.manifest_sha256,
            "run_fingerprint": run.fingerprint,
            "data_fingerprint": run.config.get("data_fingerprint"),
            "merged": merge,
            "metrics": metrics,
            "training": training_description(run),
            "notes": list(notes or []),  # e.g. checkpoints skipped because they failed verification
            "exported_at": datetime.now(UTC).isoformat(),
        }
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2, sort_keys=True))
        _normalize_modes(tmp)
        expected = _logits(model, tokenizer)
        actual = _logits(_reload(tmp, merge, base_loader), tokenizer)
        diff = float((expected - actual).abs().max())
        if not diff <= LOGITS_ATOL:
            raise CkptflowError(f"export check failed: reloaded logits differ by {diff:.3g} (> {LOGITS_ATOL})")
        faults.pause("export-written", checkpoint.step)
        (tmp / TEMP_MARKER_NAME).unlink()  # the provenance file marks it as ours from here on
        _swap_into_place(tmp, out_dir)
    finally:
        _remove_ours(tmp)
    return ExportResult(out_dir, checkpoint.step, merge, diff, time.monotonic() - t0)
