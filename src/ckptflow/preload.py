"""Import what training and the end of a run will need, at a moment the process would otherwise spend waiting.

`ckptflow run` waits for Prefect's temporary server to boot (3-5 s, in another process); the
modules a chunk imports on its first use (TRL's trainer, transformers' Trainer, accelerate) are
imported during that wait instead of later on the run's critical path (the loss curve needs
none: ckptflow.loss_curve writes SVG with the standard library). Against a running server there
is no wait, and they are still imported here, before the flow starts (see TRAINING_MODULES).
Imports run in the calling thread: two threads importing overlapping packages can deadlock on
the per-module import locks or see half-initialised modules, and the wait leaves this thread
idle anyway.
"""

from __future__ import annotations

import importlib
import logging

__all__ = ["TRAINING_MODULES", "import_training_modules"]

log = logging.getLogger(__name__)

# What a run imports only once it trains: SFTTrainer pulls in transformers.Trainer and accelerate;
# ckptflow.training (the chunk's callbacks) PEFT. Imported on the main thread before the flow starts:
# inside the flow's first chunk the same imports took 0.65 s longer (median of 3 interleaved pairs),
# sharing the GIL with Prefect's log, event and heartbeat threads.
TRAINING_MODULES = (
    "trl.trainer.sft_trainer",
    "trl.trainer.sft_config",
    "ckptflow.training",
)


def import_training_modules(modules: tuple[str, ...] = TRAINING_MODULES) -> list[str]:
    """Import `modules`; the names that failed (the real import, where it is used, raises the error users see)."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 — a head start only: never a new way for a run to fail
            log.debug("preload of %s failed: %s", name, exc)
            failed.append(name)
    return failed
