"""Build the SFTTrainer for one chunk and the callbacks that make its checkpoints safe.

Every attempt builds a fresh trainer with the same `max_steps = total_steps` (so the LR
schedule is identical to an uninterrupted run), resumes from an explicit checkpoint path,
and stops at the chunk boundary with a forced save. HF keeps every checkpoint
(`save_total_limit=None`); ckptflow commits, verifies and prunes them itself.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ckptflow import faults
from ckptflow.checkpoint_dirs import free_bytes
from ckptflow.errors import InsufficientDiskError
from ckptflow.logline import STEP_LINE, StepRate, format_log_line, is_step_line
from ckptflow.precision import check_supported
from ckptflow.settings import Settings, report_to_list


class InjectedFault(RuntimeError):
    """Raised by fault injection (settings.fault) to simulate a crash inside a chunk."""


def metrics_at_step(log_history: list[dict[str, Any]], step: int) -> dict[str, float]:
    """Eval metrics and train loss logged at `step` (HF logs them as separate entries)."""
    out: dict[str, float] = {}
    for entry in log_history:
        if entry.get("step") != step:
            continue
        for key, value in entry.items():
            if key.startswith("eval_") and isinstance(value, int | float):
                out[key] = float(value)
        if "loss" in entry and isinstance(entry["loss"], int | float):
            out["loss"] = float(entry["loss"])
    return out


class ScheduleCallback(TrainerCallback):
    """Save and evaluate exactly at the run's schedule (planning.schedule_for, what `ckptflow plan`
    prints), and stop at the chunk's last step, which is a save point (the next chunk's resume point).

    Runs after HF's DefaultFlowCallback and has the last word: on its own, after a chunk stop HF
    runs `on_epoch_end`, which under save_strategy=epoch saves the chunk end a second time and
    evaluates it — an evaluation that draws from the RNG, so the weights would depend on chunk_steps.
    """

    def __init__(self, save_points: Collection[int], eval_points: Collection[int], end_step: int) -> None:
        if end_step not in save_points:
            raise ValueError(f"chunk end {end_step} is not a save point of the run's schedule")
        self.save_points = frozenset(save_points)
        self.eval_points = frozenset(eval_points)
        self.end_step = end_step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        control.should_save = state.global_step in self.save_points
        control.should_evaluate = state.global_step in self.eval_points
        if state.global_step >= self.end_step:
            control.should_training_stop = True
        return control

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        # Decided for this step at its on_step_end already (an epoch ends on an optimizer step).
        control.should_save = control.should_evaluate = False
        return control


class FaultInjectionCallback(TrainerCallback):
    """Fail when training reaches `at_step`, before that step is saved (tests and drills)."""

    def __init__(self, at_step: int, mode: str) -> None:
        self.at_step = at_step
        self.mode = mode

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if state.global_step == self.at_step:
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise InjectedFault(f"injected fault at step {self.at_step} (CKPTFLOW_FAULT__AT_STEP)")
        return control


class PauseCallback(TrainerCallback):
    """Fault injection: pause after an optimizer step, before its save (settings.fault.pause_at=step-end)."""

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        faults.pause("step-end", state.global_step)
        return control


class DiskGuardCallback(TrainerCallback):
    """Refuse to start a save that would leave less than `min_free_bytes` free."""

    def __init__(self, directory: Path, last_checkpoint_bytes: Callable[[], int], min_free_bytes: int) -> None:
        self.directory = directory
        self.last_checkpoint_bytes = last_checkpoint_bytes
        self.min_free_bytes = min_free_bytes

    def _estimate(self, model: Any) -> int:
        """Size of the last committed checkpoint; before the first one, from the trainable parameters."""
        from ckptflow.planning import estimate_checkpoint_bytes

        last = self.last_checkpoint_bytes()
        if last or model is None:
            return last
        return estimate_checkpoint_bytes(sum(p.numel() for p in model.parameters() if p.requires_grad))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        if control.should_save:
            free = free_bytes(self.directory)
            estimate = self._estimate(kw.get("model"))
            if free < estimate + self.min_free_bytes:
                raise InsufficientDiskError(
                    f"not saving checkpoint-{state.global_step}: {free / 2**20:.1f} MiB free in {self.directory}, "
                    f"need {(estimate + self.min_free_bytes) / 2**20:.1f} MiB (checkpoint ~{estimate / 2**20:.2f} MiB "
                    f"+ min_free_bytes {self.min_free_bytes / 2**20:.1f} MiB); free space or lower "
                    f"CKPTFLOW_CHECKPOINT__MIN_FREE_BYTES, then run again to resume from the last committed checkpoint"
                )
        return control


class AllRanksSavedCallback(TrainerCallback):
    """DDP: on_save returns only once every rank has written its files of the checkpoint.

    HF calls on_save right after `_save_checkpoint` with no barrier in between, so without
    this rank 0 could hash and commit `checkpoint-N` while rank 1 is still writing its
    `rng_state_1.pth`. Every rank registers it, before CommitCallback.
    """

    def __init__(self, wait: Callable[[], None]) -> None:
        self.wait = wait

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.wait()
        return control


class CommitCallback(TrainerCallback):
    """Hand every save to the background committer (ckptflow.committer): training waits only when it must.

    At a save step, `on_begin(step)` (the `writing` row) is queued before HF writes; after HF
    wrote, `on_saved(step, epoch, metrics)` (manifest + ledger commit + retention). A failed
    background job is raised here at the next step, failing the attempt; the chunk ends only
    once every commit is durable (`on_train_end`; the caller also closes the committer when
    training raises).
    """

    def __init__(
        self, committer: Any, on_begin: Callable[[int], None], on_saved: Callable[[int, float | None, dict], None]
    ) -> None:
        self.committer = committer  # a ckptflow.committer.BackgroundCommitter
        self.on_begin = on_begin
        self.on_saved = on_saved

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.committer.raise_if_failed()
        if control.should_save:
            step = state.global_step
            self.committer.wait_for(step)  # HF is about to write checkpoint-<step>: no commit of it may be running
            self.committer.submit(step, functools.partial(self.on_begin, step))
            if faults.armed("save-begun", step):  # drills: stop before HF writes, once the row is recorded
                self.committer.wait_for(step)
        return control

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        step = state.global_step  # read now: the trainer's state moves on while the job waits
        metrics = metrics_at_step(state.log_history, step)
        self.committer.submit(step, functools.partial(self.on_saved, step, state.epoch, metrics))
        return control

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.committer.close()  # the chunk's last checkpoint is the next chunk's resume point
        return control


class LogCallback(TrainerCallback):
    """HF's logs as one readable line each (ckptflow.logline) in ckptflow's logger, instead of print() of a dict.

    One line per logging step: only the main process logs (HF calls on_log on every DDP rank).
    Training step lines carry `logline.STEP_LINE`, so the Prefect layer can batch them (tasks/step_lines.py).
    Full-precision values stay in trainer_state.json, the ledger and --json outputs.
    """

    def __init__(self, logger: Any) -> None:
        self.logger = logger
        self.rate = StepRate()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        self.rate.observe(state.global_step)
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kw: Any):
        if logs and state.is_world_process_zero:
            line = format_log_line(state.global_step, state.max_steps, logs, self.rate.rate())
            if line is not None:
                self.logger.info("%s", line, extra={STEP_LINE: is_step_line(line)})
        return control


class HeartbeatCallback(TrainerCallback):
    """Call `beat` at most every `interval` seconds (keeps the run's lease alive)."""

    def __init__(self, beat: Callable[[], None], interval: float = 10.0) -> None:
        self.beat = beat
        self.interval = interval
        self._last = 0.0

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw: Any):
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.beat()
        return control


@dataclass(frozen=True)
class TrainerSpec:
    """Everything that shapes the trainer; identical for every chunk and attempt of a run."""

    output_dir: Path
    total_steps: int
    settings: Settings


# HF's TensorBoard callback reads its log directory from this variable (else a dir inside output_dir).
TENSORBOARD_DIR_ENV = "TENSORBOARD_LOGGING_DIR"
# Under the run's directory: one TensorBoard log dir for every chunk of the run.
TENSORBOARD_DIR = "tensorboard"


def sft_config(spec: TrainerSpec, *, dataset_prepared: bool = False):
    """SFTConfig for a chunk: HF saves/evaluates on schedule, keeps everything, never picks a checkpoint.

    `dataset_prepared`: the datasets are the ones TRL prepared for an earlier chunk of the run (warm.py).
    """
    from trl import SFTConfig

    s = spec.settings
    ck = s.checkpoint
    precision = s.train.precision  # `auto` resolved as the run's fingerprint has it, never left to TRL
    check_supported(precision)
    return SFTConfig(
        output_dir=str(spec.output_dir),
        max_steps=spec.total_steps,
        num_train_epochs=s.train.epochs,
        per_device_train_batch_size=s.train.batch_size,
        per_device_eval_batch_size=s.train.batch_size,
        gradient_accumulation_steps=s.train.gradient_accumulation_steps,
        learning_rate=s.train.learning_rate,
        seed=s.train.seed,
        logging_steps=s.train.logging_steps,
        save_strategy=ck.save_strategy,
        save_steps=ck.save_steps,
        eval_strategy=ck.eval_strategy,
        eval_steps=ck.eval_steps if ck.evaluates else None,
        save_total_limit=None,  # retention is ckptflow's (HF keeps the most *recent*, not the best)
        load_best_model_at_end=False,
        max_length=s.model.max_length,
        report_to=report_to_list(s.train.report_to) or "none",
        disable_tqdm=True,
        gradient_checkpointing=s.train.gradient_checkpointing,
        ddp_timeout=s.train.ddp_timeout_seconds,  # bounds a collective that waits for a hung rank
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not _cuda_available(),
        dataloader_num_workers=0,
        dataset_kwargs={"skip_prepare_dataset": True} if dataset_prepared else None,
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
