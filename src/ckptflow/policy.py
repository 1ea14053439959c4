"""Checkpoint policies: at which steps to save, and which checkpoints to keep — and why.

In the style of Orbax's save-decision and preservation policies: small frozen dataclasses
behind two tiny protocols (`SavePolicy.should_save`, `PreservationPolicy.preserve`) that
compose any-of. Everything here is a pure function of its inputs: no I/O, no clock. The
friendly settings (`save_total_limit`, `retention`, ...) become policy objects in exactly one
place each: `retention_policy` and `save_policy`. Deleting files is the executor's job.

Unlike HF's `save_total_limit` (the N most *recent* plus the best), `retention=best` keeps
the N *best* by the metric; the newest checkpoint (the resume point) is kept on top.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from ckptflow.settings import CheckpointSettings

__all__ = [
    "AnySave",
    "AtSteps",
    "ByteBudget",
    "CheckpointLike",
    "Ckpt",
    "EveryNSteps",
    "FinalStep",
    "KeepBest",
    "KeepMilestones",
    "KeepNewest",
    "PreservationPolicy",
    "ProtectBest",
    "ProtectNewest",
    "ProtectSteps",
    "RetentionDecision",
    "RetentionPolicy",
    "SavePolicy",
    "best_of",
    "best_step",
    "decide_retention",
    "format_bytes",
    "metric_value",
    "rank_best",
    "retention_policy",
    "save_interval",
    "save_policy",
]

NEWEST_REASON = "newest (resume point)"
IN_USE_REASON = "in use by a running attempt"
_REASON_SEP = "; "


# -- values ---------------------------------------------------------------------------


class CheckpointLike(Protocol):
    """What the policies read from a checkpoint; ledger rows and `Ckpt` satisfy it."""

    @property
    def step(self) -> int: ...

    @property
    def metrics(self) -> Mapping[str, float]: ...

    @property
    def bytes(self) -> int: ...


C = TypeVar("C", bound=CheckpointLike)


@dataclass(frozen=True)
class Ckpt:
    """A plain checkpoint value for tests and the planner."""

    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    bytes: int = 0


@dataclass(frozen=True)
class RetentionDecision:
    """Every checkpoint given, in exactly one of `keep` / `prune`, keyed by step (ascending)."""

    keep: dict[int, str]
    prune: dict[int, str]

    @property
    def kept_steps(self) -> list[int]:
        return sorted(self.keep)

    @property
    def pruned_steps(self) -> list[int]:
        return sorted(self.prune)


def format_bytes(n: int) -> str:
    """`1_200_000` → `1.2 MB` (decimal units, one decimal)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def metric_value(checkpoint: CheckpointLike, metric: str) -> float | None:
    """The checkpoint's finite value of `metric`, else None (missing, NaN, inf, not a number)."""
    value = (checkpoint.metrics or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def rank_best(checkpoints: Iterable[C], metric: str, greater_is_better: bool) -> list[C]:
    """THE ranking of checkpoints by a metric, best first — retention, export, `runs` and
    `checkpoints` all use it. Ties go to the earliest step (only strictly better replaces, as in
    HF); checkpoints without a finite metric come last, newest first among them (so with no
    metrics at all, the newest is "best": what export picks when nothing is evaluated)."""

    def key(c: CheckpointLike) -> tuple[int, float, int]:
        v = metric_value(c, metric)
        if v is None:
            return (1, 0.0, -c.step)
        return (0, -v if greater_is_better else v, c.step)

    return sorted(checkpoints, key=key)


def best_of(checkpoints: Iterable[C], metric: str, greater_is_better: bool) -> C | None:
    """The best checkpoint by `metric` (`rank_best`'s first); None when none has a finite value."""
    ranked = rank_best(checkpoints, metric, greater_is_better)
    return ranked[0] if ranked and metric_value(ranked[0], metric) is not None else None


def best_step(checkpoints: Iterable[CheckpointLike], metric: str, greater_is_better: bool) -> int | None:
    """Step of the best checkpoint by `metric`; None when none has a finite value."""
    best = best_of(checkpoints, metric, greater_is_better)
    return best.step if best is not None else None


# -- preservation policies --------------------------------------------------------------


class PreservationPolicy(Protocol):
    """Which checkpoints to keep. Policies compose any-of inside a `RetentionPolicy`."""

    def preserve(self, checkpoints: Sequence[CheckpointLike]) -> dict[int, str]:
        """Steps this policy keeps, most valuable first, each with the reason."""
        ...

    def why_not(self, checkpoint: CheckpointLike) -> str:
        """Why this policy does not keep `checkpoint`."""
        ...


@dataclass(frozen=True)
class ProtectNewest:
    """The newest checkpoint: a retry resumes from it."""

    def preserve(self, checkpoints: Sequence[CheckpointLike]) -> dict[int, str]:
        return {max(c.step for c in checkpoints): NEWEST_REASON} if checkpoints else {}

    def why_not(self, checkpoint: CheckpointLike) -> str:
        return "not the newest"


@dataclass(frozen=True)
class ProtectBest:
    """The single best checkpoint by a metric (what export picks)."""

    metric: str
    greater_is_better: bool

    def preserve(self, checkpoints: Sequence[CheckpointLike]) -> dict[int, str]:
        best = best_of(checkpoints, self.metric, self.greater_is_better)
        if best is None:
            return {}
        return {best.step: f"best {self.metric}={metric_value(best, self.metric):.4g}"}

    def why_not(self, checkpoint: CheckpointLike) -> str:
        return f"not the best by {self.metric}"


@dataclass(frozen=True)
class ProtectSteps:
    """Explicit steps, e.g. the checkpoint a running attempt resumed from."""

    steps: frozenset[int]
    reason: str = IN_USE_REASON

    def preserve(self, checkpoints: Sequence[CheckpointLike]) -> dict[int, str]:
        return {c.step: self.reason for c in sorted(checkpoints, key=_by_step) if c.step in self.steps}

    def why_not(self, checkpoint: CheckpointLike) -> str:
        return f"not {self.reason}"


@dataclass(frozen=True)
class KeepNewest:
    """The `n` newest by step; `n=None` keeps all (newest most valuable)."""

    n: int | None

    def preserve(self, checkpoints: Sequence[CheckpointLike]) -> dict[int, str]:
        newest_first = sorted(checkpoints, key=_by_step, reverse=True)
        reason = "no save_total_limit (all kept)" if self.n is None else f"{self.n} most recent"
        return {c.step: reason for c in newest_first[: self.n]}

    def why_not(self, checkpoint: CheckpointLike) -> str:
        return f"older than the {self.n} most recent"


@dataclass(frozen=True)
class KeepBest:
    """The `n` best by `metric`; `n=None` keeps all (best most valuable)."""

    n: int | None
    metric: str
    greater_is_better: bool

    def preserve(self, checkpoints: Sequence[CheckpointLike]) -> dict[int, str]:
        ranked = rank_best(checkpoints, self.metric, self.greater_is_better)
        reason = "no save_total_limit (all kept)" if self.n is None else f"top-{self.n} by {self.metric}"
        return {c.step: reason for c in ranked[: self.n]}

    def why_not(self, checkpoint: CheckpointLike) -> str:
        missing = "" if metric_value(checkpoint, self.metric) is not None else f" (no finite {self.metric})"
        return f"not among the {self.n} best by {self.metric}{missing}"


@dataclass(frozen=True)
class KeepMilestones:
    """Checkpoints whose step is a multiple of `every` (newer milestones more valuable)."""

    every: int

    def preserve(self, checkpoints: Sequence[CheckpointLike]) -> dict[int, str]:
        newest_first = sorted(checkpoints, key=_by_step, reverse=True)
        return {c.step: f"milestone every {self.every} steps" for c in newest_first if c.step % self.every == 0}

    def why_not(self, checkpoint: CheckpointLike) -> str:
        return f"not a milestone (every {self.every} steps)"


@dataclass(frozen=True)
class ByteBudget:
    """Post-filter: drop kept checkpoints, least valuable first, until the total fits."""

    max_bytes: int

    def trim(self, least_valuable_first: Sequence[CheckpointLike], total: int) -> tuple[dict[int, str], int]:
        """Return (dropped step → reason, remaining total bytes)."""
        dropped: dict[int, str] = {}
        for c in least_valuable_first:
            if total <= self.max_bytes:
                break
            dropped[c.step] = f"over max_total_bytes budget ({format_bytes(total)} > {format_bytes(self.max_bytes)})"
            total -= c.bytes
        return dropped, total


def _by_step(c: CheckpointLike) -> int:
    return c.step


@dataclass(frozen=True)
class RetentionPolicy:
    """Any-of composition. `protect` policies are never dropped by the budget; `keep`
    policies are listed most valuable first, which sets the budget's drop order."""

    protect: tuple[PreservationPolicy, ...] = ()
    keep: tuple[PreservationPolicy, ...] = ()
    budget: ByteBudget | None = None

    def with_protected(self, steps: Collection[int]) -> RetentionPolicy:
        if not steps:
            return self
        return replace(self, protect=(*self.protect, ProtectSteps(frozenset(steps))))


def retention_policy(ck: CheckpointSettings) -> RetentionPolicy:
    """THE factory from friendly settings to policy objects.

    Always protected: the newest and the best by `ck.metric_key`. Kept by the limit: the
    `save_total_limit` best (`retention=best`) or newest (`recent`); then milestones. Under
    `max_total_bytes`, milestone-only checkpoints are dropped first (oldest first), then
    limit-kept ones (worst metric first under best, oldest first under recent): the limit is
    the user's main intent, milestones are extras.
    """
    limit = ck.save_total_limit
    primary: PreservationPolicy = (
        KeepBest(limit, ck.metric_key, ck.greater_is_better) if ck.retention == "best" else KeepNewest(limit)
    )
    keep = (primary, KeepMilestones(ck.keep_every_steps)) if ck.keep_every_steps else (primary,)
    return RetentionPolicy(
        protect=(ProtectNewest(), ProtectBest(ck.metric_key, ck.greater_is_better)),
        keep=keep,
        budget=ByteBudget(ck.max_total_bytes) if ck.max_total_bytes else None,
    )


def decide_retention(
    policy: RetentionPolicy, checkpoints: Sequence[CheckpointLike], protected: Collection[int] = ()
) -> RetentionDecision:
    """Split `checkpoints` into keep / prune, each step with a human reason.

    `protected` steps (e.g. a checkpoint a running attempt resumed from) are kept on top of
    the limit, like the newest and the best. Idempotent: deciding again over the kept set
    prunes nothing. Raises ValueError on duplicate steps.
    """
    _require_unique_steps(checkpoints)
    policy = policy.with_protected(protected)
    # 1. protected, then kept by a keep policy (value rank = (policy index, position))
    guarded = _merge(p.preserve(checkpoints) for p in policy.protect)
    kept_by, rank = _preserve_ranked(policy.keep, checkpoints)
    keep = _merge([guarded, kept_by])
    prune = {c.step: _why_not(policy.keep, c) for c in checkpoints if c.step not in keep}
    # 2. the byte budget drops unprotected kept checkpoints, least valuable first
    if policy.budget is not None:
        _apply_budget(policy.budget, checkpoints, guarded, rank, keep, prune)
    return RetentionDecision(keep=dict(sorted(keep.items())), prune=dict(sorted(prune.items())))


def _require_unique_steps(checkpoints: Sequence[CheckpointLike]) -> None:
    steps = [c.step for c in checkpoints]
    if len(set(steps)) != len(steps):
        dupes = sorted({s for s in steps if steps.count(s) > 1})
        raise ValueError(f"duplicate checkpoint steps {dupes}: each step must appear once")


def _merge(reason_maps: Iterable[dict[int, str]]) -> dict[int, str]:
    merged: dict[int, list[str]] = {}
    for reasons in reason_maps:
        for step, why in reasons.items():
            if why not in merged.setdefault(step, []):
                merged[step].append(why)
    return {step: _REASON_SEP.join(whys) for step, whys in merged.items()}


def _preserve_ranked(
    policies: Sequence[PreservationPolicy], checkpoints: Sequence[CheckpointLike]
) -> tuple[dict[int, str], dict[int, tuple[int, int]]]:
    """Merged keep reasons, and each kept step's best (policy index, position) — lower = more valuable."""
    maps = [p.preserve(checkpoints) for p in policies]
    rank: dict[int, tuple[int, int]] = {}
    for i, reasons in enumerate(maps):
        for j, step in enumerate(reasons):
            rank[step] = min(rank.get(step, (i, j)), (i, j))
    return _merge(maps), rank


def _why_not(policies: Sequence[PreservationPolicy], checkpoint: CheckpointLike) -> str:
    return _REASON_SEP.join(p.why_not(checkpoint) for p in policies) or "not kept by any policy"


def _apply_budget(
    budget: ByteBudget,
    checkpoints: Sequence[CheckpointLike],
    guarded: dict[int, str],
    rank: dict[int, tuple[int, int]],
    keep: dict[int, str],
    prune: dict[int, str],
) -> None:
    """Move over-budget checkpoints from `keep` to `prune`; note when protected ones overrun it."""
    kept = [c for c in checkpoints if c.step in keep]
    droppable = sorted((c for c in kept if c.step not in guarded), key=lambda c: rank[c.step], reverse=True)
    dropped, total = budget.trim(droppable, sum(c.bytes for c in kept))
    for step, why in dropped.items():
        del keep[step]
        prune[step] = why
    if total > budget.max_bytes:
        over = f"({format_bytes(total)} > {format_bytes(budget.max_bytes)})"
        note = f"protected, so kept although over max_total_bytes budget {over}"
        for step in guarded:
            keep[step] = f"{keep[step]}{_REASON_SEP}{note}"


# -- save policies --------------------------------------------------------------------


class SavePolicy(Protocol):
    """Whether to save a checkpoint at `step` of a run of `total_steps` optimizer steps."""

    def should_save(self, step: int, total_steps: int) -> bool: ...


@dataclass(frozen=True)
class EveryNSteps:
    n: int

    def should_save(self, step: int, total_steps: int) -> bool:
        return step > 0 and step % self.n == 0


@dataclass(frozen=True)
class FinalStep:
    def should_save(self, step: int, total_steps: int) -> bool:
        return step == total_steps


@dataclass(frozen=True)
class AtSteps:
    """Explicit steps, e.g. chunk boundaries where ckptflow forces a save."""

    steps: frozenset[int]

    def should_save(self, step: int, total_steps: int) -> bool:
        return step in self.steps


@dataclass(frozen=True)
class AnySave:
    policies: tuple[SavePolicy, ...]

    def should_save(self, step: int, total_steps: int) -> bool:
        return any(p.should_save(step, total_steps) for p in self.policies)


def save_policy(ck: CheckpointSettings, steps_per_epoch: int) -> SavePolicy:
    """HF's saves: every `save_steps` (or every epoch = `steps_per_epoch` steps), plus the last step.

    Chunk-boundary saves are composed on top by the caller (`AnySave((save_policy(...), AtSteps(...)))`).
    """
    return AnySave((EveryNSteps(save_interval(ck, steps_per_epoch)), FinalStep()))


def save_interval(ck: CheckpointSettings, steps_per_epoch: int) -> int:
    """Optimizer steps between HF's saves: `save_steps`, or one epoch under save_strategy=epoch."""
    if steps_per_epoch <= 0:
        raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
    return ck.save_steps if ck.save_strategy == "steps" else steps_per_epoch
