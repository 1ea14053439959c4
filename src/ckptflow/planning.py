"""The run plan that `ckptflow plan` prints: chunks, save/eval points, what is kept, disk.

Pure arithmetic over the checkpoint settings and numbers the caller measures (steps per
epoch, bytes per checkpoint, free disk). The schedule (`schedule_for`: chunk ends, save and
eval points) is the one the flow trains by and every chunk's trainer saves and evaluates by;
what is kept comes from the real retention policy objects. So the plan is what a run does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ckptflow.checkpoint_dirs import DEFAULT_MIN_FREE_BYTES  # free-disk margin when min_free_bytes is empty
from ckptflow.policy import (
    AnySave,
    AtSteps,
    Ckpt,
    decide_retention,
    format_bytes,
    retention_policy,
    save_interval,
    save_policy,
)

if TYPE_CHECKING:
    from ckptflow.settings import CheckpointSettings, Settings

__all__ = [
    "AtStep",
    "Chunk",
    "Plan",
    "Schedule",
    "auto_chunk_steps",
    "chunk_plan",
    "eval_points",
    "estimate_checkpoint_bytes",
    "make_plan",
    "run_schedule",
    "save_points",
    "schedule_for",
]

CHUNKS_PER_RUN = 4  # auto chunking aims at about this many Prefect tasks per run
ADAMW_STATE_BYTES_PER_PARAM = 2 * 4  # exp_avg + exp_avg_sq, fp32
CHECKPOINT_EXTRA_BYTES = 64 * 1024  # rng_state, scheduler, trainer_state, tokenizer, configs
_MAX_LISTED = 8  # steps named in one warning


@dataclass(frozen=True)
class Chunk:
    """One Prefect task: trains steps (start_step, end_step]; index from 0."""

    index: int
    start_step: int
    end_step: int


@dataclass(frozen=True)
class AtStep:
    """A run that died at `died_at`: what was saved, what certainly exists, where it resumes.

    `exist` lists the steps certain to exist (metrics are unknown when planning);
    `exist_rule` says in words what else may exist.
    """

    died_at: int
    saved: list[int]
    exist: list[int]
    exist_rule: str
    resume_from: int | None


@dataclass(frozen=True)
class Plan:
    total_steps: int
    steps_per_epoch: int
    chunks: list[Chunk]
    save_points: list[int]
    eval_points: list[int]
    kept_at_end: list[int] | str  # steps when knowable without metrics; else the rule in words (best)
    rule: str
    bytes_per_checkpoint: int
    checkpoints_on_disk_max: int
    disk_needed_bytes: int
    free_bytes: int
    fits: bool
    warnings: list[str]
    at: AtStep | None

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only (chunks and `at` become dicts)."""
        return asdict(self)


@dataclass(frozen=True)
class Schedule:
    """When a run's chunks end, when it saves and when it evaluates.

    The one schedule: `ckptflow plan` prints it, the flow trains its chunks, and every
    chunk's trainer saves and evaluates exactly at its steps (training.ScheduleCallback).
    """

    total_steps: int
    steps_per_epoch: int
    chunks: list[Chunk]
    save_points: list[int]
    eval_points: list[int]


def auto_chunk_steps(total_steps: int, save_every: int) -> int:
    """About `CHUNKS_PER_RUN` chunks, each a multiple of the save interval (so chunk ends are
    save points) and at least one interval long: T=4, every 2 → 2; T=10000, every 500 → 2500."""
    if total_steps <= 0 or save_every <= 0:
        raise ValueError(f"total_steps and save_steps must be positive, got {total_steps} and {save_every}")
    target = math.ceil(total_steps / CHUNKS_PER_RUN)
    return save_every * max(1, math.ceil(target / save_every))


def chunk_plan(total_steps: int, chunk_steps: int, save_every: int) -> list[Chunk]:
    """Chunk k trains up to step min((k+1)·C, T); `chunk_steps=0` picks C from `save_every`
    (the save interval: `save_interval(ck, steps_per_epoch)`)."""
    if chunk_steps < 0:
        raise ValueError(f"chunk_steps must be 0 (auto) or positive, got {chunk_steps}")
    size = chunk_steps or auto_chunk_steps(total_steps, save_every)
    count = math.ceil(total_steps / size)
    return [Chunk(k, k * size, min((k + 1) * size, total_steps)) for k in range(count)]


def save_points(total_steps: int, ck: CheckpointSettings, steps_per_epoch: int, chunks: Sequence[Chunk]) -> list[int]:
    """HF's saves (save_steps multiples / epoch ends, and the last step) ∪ every chunk end."""
    forced = AtSteps(frozenset(c.end_step for c in chunks))
    policy = AnySave((save_policy(ck, steps_per_epoch), forced))
    return [s for s in range(1, total_steps + 1) if policy.should_save(s, total_steps)]


def eval_points(total_steps: int, ck: CheckpointSettings, steps_per_epoch: int) -> list[int]:
    """Every eval_steps (or every epoch end) and the last step, as HF evaluates; [] when eval_strategy
    is `no`. Never chunk ends: an evaluation draws from the RNG (its DataLoader's seed), so evaluating
    at chunk ends would make the weights depend on chunk_steps."""
    if not ck.evaluates:
        return []
    every = ck.eval_steps if ck.eval_strategy == "steps" else steps_per_epoch
    return sorted({*range(every, total_steps + 1, every), total_steps})


def run_schedule(ck: CheckpointSettings, *, total_steps: int, steps_per_epoch: int, chunk_steps: int) -> Schedule:
    """The schedule of a run of `total_steps` optimizer steps (`chunk_steps=0`: automatic chunks)."""
    chunks = chunk_plan(total_steps, chunk_steps, save_interval(ck, steps_per_epoch))
    saves = save_points(total_steps, ck, steps_per_epoch, chunks)
    return Schedule(total_steps, steps_per_epoch, chunks, saves, eval_points(total_steps, ck, steps_per_epoch))


def schedule_for(settings: Settings, *, total_steps: int, train_rows: int) -> Schedule:
    """The schedule of a run with these settings over `train_rows` training rows (what the flow
    and every chunk's trainer follow; `total_steps` is the run's, as recorded in the ledger)."""
    from ckptflow.settings import steps_per_epoch

    train = settings.train
    # DDP: an epoch is counted in global batches (batch_size × world size × accumulation).
    per_epoch = steps_per_epoch(train_rows, train.batch_size, train.gradient_accumulation_steps, train.world_size)
    return run_schedule(
        settings.checkpoint, total_steps=total_steps, steps_per_epoch=per_epoch, chunk_steps=train.chunk_steps
    )


def estimate_checkpoint_bytes(
    trainable_params: int, *, param_bytes: int = 4, extra_bytes: int = CHECKPOINT_EXTRA_BYTES
) -> int:
    """Adapter weights + AdamW moments (exp_avg, exp_avg_sq in fp32) + small files."""
    return trainable_params * param_bytes + trainable_params * ADAMW_STATE_BYTES_PER_PARAM + extra_bytes


def make_plan(
    ck: CheckpointSettings,
    schedule: Schedule,
    *,
    bytes_per_checkpoint: int,
    free_bytes: int,
    at_step: int | None = None,
) -> Plan:
    """Everything `ckptflow plan` shows, without training: `schedule` (from `schedule_for`, as the
    run itself) plus what retention keeps, disk, and where a run that died at `at_step` resumes."""
    # 1. when chunks end, when the run saves and evaluates: the schedule the run follows
    saves = schedule.save_points
    # 2. what retention keeps at the end
    rule = _kept_rule(ck, saves)
    # Under best, metric values decide unless every save fits within the limit anyway.
    known = ck.retention == "recent" or ck.save_total_limit is None or len(saves) <= ck.save_total_limit
    kept: list[int] | str = _kept_without_metrics(ck, saves, bytes_per_checkpoint) if known else rule
    # 3. disk: peak checkpoints on disk, margin, fit
    on_disk = _on_disk_max(ck, saves)
    needed = _disk_needed(ck, on_disk, len(saves), bytes_per_checkpoint)
    margin = DEFAULT_MIN_FREE_BYTES if ck.min_free_bytes is None else ck.min_free_bytes
    fits = needed + margin <= free_bytes
    warnings = _warnings(ck, schedule, bytes_per_checkpoint, needed, margin, free_bytes, fits)
    at = _at_step(ck, saves, at_step, bytes_per_checkpoint) if at_step is not None else None
    return Plan(
        total_steps=schedule.total_steps,
        steps_per_epoch=schedule.steps_per_epoch,
        chunks=schedule.chunks,
        save_points=saves,
        eval_points=schedule.eval_points,
        kept_at_end=kept,
        rule=rule,
        bytes_per_checkpoint=bytes_per_checkpoint,
        checkpoints_on_disk_max=on_disk,
        disk_needed_bytes=needed,
        free_bytes=free_bytes,
        fits=fits,
        warnings=warnings,
        at=at,
    )


def _kept_without_metrics(ck: CheckpointSettings, saves: Sequence[int], bytes_per_checkpoint: int) -> list[int]:
    """What the real policy keeps when every save is committed and none has metrics."""
    checkpoints = [Ckpt(step=s, bytes=bytes_per_checkpoint) for s in saves]
    return decide_retention(retention_policy(ck), checkpoints).kept_steps


def _direction(ck: CheckpointSettings) -> str:
    return "highest" if ck.greater_is_better else "lowest"


def _extras(ck: CheckpointSettings) -> str:
    parts = []
    if ck.keep_every_steps:
        parts.append(f", plus milestones every {ck.keep_every_steps} steps")
    if ck.max_total_bytes:
        parts.append(f", within max_total_bytes={format_bytes(ck.max_total_bytes)} (protected ones excepted)")
    return "".join(parts)


def _best_if_older(ck: CheckpointSettings) -> str:
    return f", plus the best by {ck.metric_key} if it is older" if ck.evaluates else ""


def _kept_rule(ck: CheckpointSettings, saves: Sequence[int]) -> str:
    """What is kept at the end of the run, in words."""
    n, limit = len(saves), ck.save_total_limit
    if limit is None or n <= limit:
        return f"all {n} saves" + _extras(ck)
    if ck.retention == "recent":
        return f"the {limit} most recent of the {n} saves" + _best_if_older(ck) + _extras(ck)
    return (
        f"the {limit} best by {ck.metric_key} ({_direction(ck)}) among the {n} saves, "
        f"plus the newest (step {saves[-1]})" + _extras(ck)
    )


def _on_disk_max(ck: CheckpointSettings, saves: Sequence[int]) -> int:
    """Peak checkpoints on disk: the limit, plus the one protected checkpoint that can fall
    outside it (the newest under best, the best under recent), plus milestones, plus the
    checkpoint being written before the previous one is pruned; capped by the saves."""
    n, limit = len(saves), ck.save_total_limit
    if limit is None:
        return n
    outside = 1 if ck.retention == "best" or ck.evaluates else 0
    milestones = sum(1 for s in saves if ck.keep_every_steps and s % ck.keep_every_steps == 0)
    return min(n, limit + outside + milestones + 1)


def _disk_needed(ck: CheckpointSettings, on_disk: int, n_saves: int, bytes_per_checkpoint: int) -> int:
    """Bytes for the peak; max_total_bytes caps it, but never below the protected ones."""
    needed = on_disk * bytes_per_checkpoint
    if ck.max_total_bytes is None:
        return needed
    protected = min(n_saves, 2 if ck.evaluates else 1) * bytes_per_checkpoint
    return min(needed, max(ck.max_total_bytes, protected))


def _listed(steps: Sequence[int]) -> str:
    shown = ", ".join(map(str, steps[:_MAX_LISTED]))
    return shown + (f", … ({len(steps)} in all)" if len(steps) > _MAX_LISTED else "")


def _warnings(
    ck: CheckpointSettings,
    schedule: Schedule,
    bytes_per_checkpoint: int,
    needed: int,
    margin: int,
    free_bytes: int,
    fits: bool,
) -> list[str]:
    out: list[str] = []
    if not fits:
        out.append(
            f"the planned checkpoints need {format_bytes(needed)} plus a {format_bytes(margin)} free-space margin, "
            f"but only {format_bytes(free_bytes)} is free: lower CKPTFLOW_CHECKPOINT__SAVE_TOTAL_LIMIT "
            "or set CKPTFLOW_CHECKPOINT__MAX_TOTAL_BYTES (or free disk space)"
        )
    if ck.max_total_bytes is not None and ck.max_total_bytes < bytes_per_checkpoint:
        out.append(
            f"max_total_bytes={format_bytes(ck.max_total_bytes)} is smaller than one checkpoint "
            f"({format_bytes(bytes_per_checkpoint)}): only protected checkpoints are kept and they exceed the budget; "
            "raise CKPTFLOW_CHECKPOINT__MAX_TOTAL_BYTES"
        )
    unevaluated = sorted(set(schedule.save_points) - set(schedule.eval_points))
    if ck.retention == "best" and ck.evaluates and unevaluated:
        grid = "CKPTFLOW_CHECKPOINT__EVAL_STEPS" if ck.eval_strategy == "steps" else f"one epoch ({schedule.steps_per_epoch} steps)"
        out.append(
            f"saves at chunk ends {_listed(unevaluated)} have no eval metric, so retention=best ranks them below every "
            f"evaluated checkpoint: make CKPTFLOW_TRAIN__CHUNK_STEPS a multiple of {grid}, or 0 (auto)"
        )
    return out


def _at_step(ck: CheckpointSettings, saves: Sequence[int], died_at: int, bytes_per_checkpoint: int) -> AtStep:
    """A run that died at `died_at` resumes from the newest save <= died_at (not the best:
    that would throw away the training done since)."""
    saved = [s for s in saves if s <= died_at]
    if not saved:
        return AtStep(died_at, [], [], f"no checkpoint saved by step {died_at}: the run starts from scratch", None)
    if ck.retention == "recent":
        exist = _kept_without_metrics(ck, saved, bytes_per_checkpoint)
    else:
        exist = _certain_under_best(ck, saved, bytes_per_checkpoint)
    return AtStep(died_at, saved, exist, _exist_rule(ck, saved), saved[-1])


def _certain_under_best(ck: CheckpointSettings, saved: Sequence[int], bytes_per_checkpoint: int) -> list[int]:
    """Under best the metrics are unknown: all saves if no more than the limit, else the
    newest and the milestones; only the newest if the byte budget may drop the rest."""
    limit, K = ck.save_total_limit, ck.keep_every_steps
    certain = list(saved) if limit is None or len(saved) <= limit else [s for s in saved if K and s % K == 0]
    certain = sorted({*certain, saved[-1]})
    if ck.max_total_bytes is not None and len(certain) * bytes_per_checkpoint > ck.max_total_bytes:
        return [saved[-1]]
    return certain


def _exist_rule(ck: CheckpointSettings, saved: Sequence[int]) -> str:
    n, limit, newest = len(saved), ck.save_total_limit, saved[-1]
    if limit is None or n <= limit:
        return f"all {n} saves so far ({saved[0]}..{newest})" + _extras(ck)
    if ck.retention == "recent":
        return f"the {limit} most recent saves up to step {newest}" + _best_if_older(ck) + _extras(ck)
    return (
        f"the {limit} best by {ck.metric_key} among steps {saved[0]}..{newest}, plus the newest ({newest})"
        + _extras(ck)
    )
