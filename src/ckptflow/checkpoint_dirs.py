"""Where HF writes a run's checkpoints, and the free space a save must leave: no torch, no transformers.

Kept apart from training.py (which defines TrainerCallbacks, so it imports transformers, torch and
PEFT: ~3.5 s) so that importing the flows — `prefect deploy`, `ckptflow serve`, a worker's
flow-run process before it trains — does not import the training stack.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["CHECKPOINT_PREFIX", "DEFAULT_MIN_FREE_BYTES", "checkpoint_dir", "free_bytes"]

# Margin kept free on disk when min_free_bytes is not set.
DEFAULT_MIN_FREE_BYTES = 64 * 2**20
# HF's checkpoint directory prefix; users and HF tooling expect `checkpoint-<step>`.
CHECKPOINT_PREFIX = "checkpoint-"


def checkpoint_dir(output_dir: Path | str, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def free_bytes(path: Path) -> int:
    path.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free
