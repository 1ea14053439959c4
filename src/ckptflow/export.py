"""Export a checkpoint as a model plain `transformers` can load, atomically, and check the result.

Steps: (1) merge LoRA into a fresh base (or keep the adapter); (2) write safetensors,
tokenizer, model card and provenance into a temp dir beside the target; (3) reload it
and compare logits with the in-memory model; (4) swap it into place with renames.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ckptflow import faults
from ckptflow.errors import CkptflowError
from ckptflow.ledger import CheckpointRecord, RunRecord

# Files ckptflow adds to an export.
CARD_NAME = "README.md"
PROVENANCE_NAME = "ckptflow-provenance.json"
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


def _model_card(run: RunRecord, ckpt: CheckpointRecord, merged: bool, metrics: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sorted(metrics.items()))
    kind = "LoRA merged into the base weights" if merged else "LoRA adapter (load with PEFT on the base model)"
    return (
        f"# {run.name}\n\n"
        f"Fine-tuned with ckptflow (TRL SFTTrainer + PEFT LoRA): {kind}.\n\n"
        f"- base model: `{run.base_model}`\n"
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


def _swap_into_place(tmp: Path, target: Path) -> None:
    """Put tmp at target. Where the OS can, one atomic exchange: target is never missing, not even
    for an instant; else the old target is renamed aside first (recovered by `_recover_interrupted`)."""
    if target.exists() and _exchange(tmp, target):
        _fsync_dir(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous export
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _recover_interrupted(target: Path) -> None:
    """Undo what a killed export left beside `target`: restore a previous export that was moved
    aside but not replaced, and delete temp dirs (half-written exports, or old ones after a swap)."""
    olds = sorted(p for p in target.parent.glob(f".{target.name}.old-*") if not _owner_alive(p))
    if olds and not target.exists():
        os.replace(olds.pop(), target)
    for leftover in [*olds, *target.parent.glob(f".{target.name}.tmp-*")]:
        if not _owner_alive(leftover):
            shutil.rmtree(leftover, ignore_errors=True)


def _owner_alive(path: Path) -> bool:
    """Whether the process that named `path` (`...-<pid>`) is another live process (a concurrent export)."""
    import psutil

    pid = path.name.rsplit("-", 1)[-1]
    return pid.isdigit() and int(pid) != os.getpid() and psutil.pid_exists(int(pid))


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
    """Write `checkpoint` of `run` to `out_dir` (see module docstring); raises CkptflowError if the reload check fails."""
    from peft import PeftModel

    t0 = time.monotonic()
    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _recover_interrupted(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model = PeftModel.from_pretrained(base_loader(), checkpoint.path)
    if merge:
        model = model.merge_and_unload()
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / CARD_NAME).write_text(_model_card(run, checkpoint, merge, metrics))
        provenance = {
            "run": run.name,
            "run_id": run.id,
            "base_model": run.base_model,
            "step": checkpoint.step,
            "total_steps": run.total_steps,
            "checkpoint_path": checkpoint.path,
            "manifest_sha256": checkpoint.manifest_sha256,
            "run_fingerprint": run.fingerprint,
            "data_fingerprint": run.config.get("data_fingerprint"),
            "merged": merge,
            "metrics": metrics,
            "settings": run.config.get("settings"),
            "notes": list(notes or []),  # e.g. checkpoints skipped because they failed verification
            "exported_at": datetime.now(UTC).isoformat(),
        }
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2, sort_keys=True))
        expected = _logits(model, tokenizer)
        actual = _logits(_reload(tmp, merge, base_loader), tokenizer)
        diff = float((expected - actual).abs().max())
        if not diff <= LOGITS_ATOL:
            raise CkptflowError(f"export check failed: reloaded logits differ by {diff:.3g} (> {LOGITS_ATOL})")
        faults.pause("export-written", checkpoint.step)
        _swap_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out_dir, checkpoint.step, merge, diff, time.monotonic() - t0)
