"""One readable line per HF log event: what a person watching the Prefect UI or a terminal wants.

    step 3/4 (75%) · loss 6.198 · lr 1.00e-04 · grad 0.210 · 2.41 steps/s · ETA 0:00:01
    step 4/4 (100%) · eval loss 6.8919 · ppl 984.2 · eval 0.65 s

Full-precision values stay in the ledger, trainer_state.json and `--json` outputs; this is display only.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

# HF log keys shown, in order, with their label and format.
_TRAIN_FIELDS = (("loss", "loss", "{:.4g}"), ("learning_rate", "lr", "{:.2e}"), ("grad_norm", "grad", "{:.3g}"))
# The final summary HF logs once per train() call (train_runtime, train_loss, …).
_SUMMARY_KEY = "train_runtime"
# LogRecord attribute (logging's `extra`) marking a training step line, the per-step stream: an
# orchestrator may batch these before they cross a network; every other line matters on its own.
STEP_LINE = "ckptflow_step_line"
# A training step line, anywhere in a text (a child process's relayed output carries a prefix); not an eval line.
_STEP_LINE_RE = re.compile(r"step \d+/\d+ \(\d+%\)(?! · eval )")


def _eta(seconds: float) -> str:
    return str(timedelta(seconds=int(round(seconds))))


@dataclass
class StepRate:
    """Optimizer steps per second over this process's steps (a resumed chunk starts counting afresh)."""

    first_step: int | None = None
    first_time: float = 0.0
    last: float | None = None
    clock: Any = field(default=time.monotonic)

    def observe(self, step: int) -> float | None:
        now = self.clock()
        if self.first_step is None:
            self.first_step, self.first_time = step, now
            return None
        elapsed, steps = now - self.first_time, step - self.first_step
        self.last = steps / elapsed if elapsed > 0 and steps > 0 else None
        return self.last

    def rate(self) -> float | None:
        """The rate at the last observed step (None before two steps)."""
        return self.last


def format_log_line(step: int, total_steps: int, logs: dict[str, Any], rate: float | None) -> str | None:
    """The line for one HF `on_log` event; None for events nobody reads (HF's end-of-train summary)."""
    if _SUMMARY_KEY in logs:
        return None
    percent = 100 * step / total_steps if total_steps else 0
    parts = [f"step {step}/{total_steps} ({percent:.0f}%)"]
    if "eval_loss" in logs:
        loss = logs["eval_loss"]
        parts.append(f"eval loss {loss:.4f}")
        if isinstance(loss, int | float) and math.isfinite(loss) and loss < 50:
            parts.append(f"ppl {math.exp(loss):.4g}")
        if "eval_runtime" in logs:
            parts.append(f"eval {logs['eval_runtime']:.2f} s")
        return " · ".join(parts)
    for key, label, fmt in _TRAIN_FIELDS:
        value = logs.get(key)
        if isinstance(value, int | float):
            parts.append(f"{label} {fmt.format(value)}")
    if rate:
        parts.append(f"{rate:.3g} steps/s")
        parts.append(f"ETA {_eta(max(0, total_steps - step) / rate)}")
    return " · ".join(parts)


def is_step_line(text: str) -> bool:
    """Whether `text` holds a training step line of `format_log_line` (not an eval line)."""
    return _STEP_LINE_RE.search(text) is not None


__all__ = ["STEP_LINE", "StepRate", "format_log_line", "is_step_line"]
