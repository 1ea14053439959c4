"""Train one chunk of a run: reconcile, pick the resume point, train to the boundary, commit.

`run_chunk` is what every launcher executes (in this process, in a child process, or
under torchrun). It is idempotent: a chunk whose end step is already committed is a no-op.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

from ckptflow import distributed, faults
from ckptflow.errors import InsufficientDiskError, LeaseLostError
from ckptflow.committer import BackgroundCommitter, CommitterLedger, CommittedSize, commit_checkpoint
from ckptflow.integrity import dir_bytes, quarantine
from ckptflow.lease import lease_holder_id  # noqa: F401 - re-exported (tasks, flows, drills import it from here)
from ckptflow.ledger import AttemptStatus, CheckpointState, Fence, Ledger, RunRecord, holding
from ckptflow.policy import format_bytes
from ckptflow.recovery import reconcile, resume_point
from ckptflow.planning import Chunk, Schedule, schedule_for
from ckptflow.remote_uploads import CheckpointUploads, open_uploads, upload_missing, uploading
from ckptflow.retention import apply_retention
from ckptflow.settings import Settings, settings_from_json
from ckptflow.checkpoint_dirs import DEFAULT_MIN_FREE_BYTES, checkpoint_dir, free_bytes

# The trainer side (ckptflow.training: transformers, torch, PEFT, ~3.5 s of imports) is imported where a chunk
# trains, not here: importing the flows (`prefect deploy`, `ckptflow serve`) must not import the training stack.

log = logging.getLogger(__name__)


# Environment variable that hands a child process the ledger URL (never written into the job file).
LEDGER_URL_ENV = "CKPTFLOW_LEDGER_URL"


@dataclass(frozen=True)
class ChunkJob:
    """A chunk to train; plain JSON so a child process can receive it."""

    ledger_url: str
    run_name: str
    chunk: int
    start_step: int
    end_step: int
    settings: dict[str, Any]
    lease_holder: str | None = None
    lease_token: int | None = None  # the holder's acquisition; None = its current one (read at begin)
    prefect_flow_run_id: str | None = None
    prefect_task_run_id: str | None = None

    def to_json(self) -> str:
        """The job for a child process, without the ledger URL (it may carry a password: see `child_env`)."""
        document = asdict(self)
        del document["ledger_url"]
        return json.dumps(document)

    @classmethod
    def from_json(cls, text: str, ledger_url: str | None = None) -> ChunkJob:
        """Rebuild a job written by `to_json`; the ledger URL comes from `ledger_url` or the environment."""
        url = ledger_url or os.environ.get(LEDGER_URL_ENV)
        if not url:
            raise RuntimeError(f"the chunk job needs the ledger URL in {LEDGER_URL_ENV}")
        return cls(ledger_url=url, **json.loads(text))

    def child_env(self) -> dict[str, str]:
        """Environment a child process needs to run this job: the ledger URL, kept out of every file."""
        return {LEDGER_URL_ENV: self.ledger_url}

    @classmethod
    def for_chunk(cls, settings: Settings, run_name: str, chunk: Chunk, **extra: Any) -> ChunkJob:
        """The job of `chunk` of run `run_name`; `extra`: lease holder and Prefect run ids."""
        return cls(
            ledger_url=settings.ledger,
            run_name=run_name,
            chunk=chunk.index,
            start_step=chunk.start_step,
            end_step=chunk.end_step,
            settings=settings.to_json(),  # without the ledger URL: see `to_json`
            **extra,
        )


@dataclass(frozen=True)
class ChunkResult:
    chunk: int
    attempt: int | None
    resumed_from_step: int | None
    end_step: int
    skipped: bool
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AttemptPlan:
    """Where an attempt starts; decided by the parent so every worker process resumes from the same place."""

    attempt_id: int
    attempt: int
    resume_step: int | None
    resume_path: str | None
    notes: list[str] = field(default_factory=list)
    fence: list | None = None  # [run_id, holder, token] of the lease every write of the attempt is fenced by
    total_steps: int | None = None  # the run's; ranks > 0 of torchrun read it here, not from the ledger

    @property
    def lease(self) -> Fence | None:
        return Fence(*self.fence) if self.fence else None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> AttemptPlan:
        return cls(**json.loads(text))


# A launcher trains one attempt somewhere (this process, a child, torchrun) and raises on failure.
Launch = Callable[[ChunkJob, AttemptPlan], None]


def begin_attempt(job: ChunkJob) -> AttemptPlan | None:
    """Check the lease, reconcile the run's files with the ledger, pick the resume point, open an attempt row.

    Returns None when the chunk's end step is already committed (nothing to do; if reconcile
    or verification repaired something, a completed attempt row records it). Raises
    LeaseLostError when the job names a lease holder that no longer holds the run's lease.
    """
    settings = settings_from_json(job.settings)
    faults.configure(settings.fault)
    ledger = _ledger(job)
    try:
        run = _run(ledger, job)
        fence = _job_fence(ledger, run.id, job)  # only the run's single writer may reconcile (it abandons attempts)
        with _fenced(job, fence):
            return _begin(ledger, run, settings, job, fence)
    finally:
        ledger.close()


def _job_fence(ledger: Ledger, run_id: int, job: ChunkJob) -> Fence | None:
    """The lease acquisition the job's writes are fenced by (None: the job names no holder)."""
    if not job.lease_holder:
        return None
    if job.lease_token is None:
        return ledger.current_fence(run_id, job.lease_holder)
    ledger.heartbeat(run_id, job.lease_holder, token=job.lease_token)  # raises if taken over since
    return Fence(run_id, job.lease_holder, job.lease_token)


def _fenced(job: ChunkJob, fence: Fence | None) -> contextlib.AbstractContextManager:
    return holding(job.ledger_url, fence) if fence else contextlib.nullcontext()


def _ledger(job: ChunkJob) -> Ledger:
    """The job's ledger; stored paths resolve against the job's CKPTFLOW_HOME."""
    return Ledger(job.ledger_url, home=job.settings.get("home"))


def _begin(ledger: Ledger, run: RunRecord, settings: Settings, job: ChunkJob, fence: Fence | None) -> AttemptPlan | None:
    ckpt_dir, quarantine_dir = settings.checkpoints_dir(run.name), settings.quarantine_dir(run.name)
    remote_url = settings.checkpoint.remote_url  # an empty home resumes from its verified copies
    notes = reconcile(ledger, run.id, ckpt_dir, quarantine_dir, remote_url=remote_url)
    resume = resume_point(ledger, run.id, ckpt_dir, quarantine_dir, remote_url=remote_url)
    notes += resume.notes if resume else []  # (reconcile and resume_point log their own notes)
    for note in _unusable_newer(ledger, run.id, resume.step if resume else 0, notes):
        log.warning(note)
        notes.append(note)
    done = resume is not None and resume.step >= job.end_step
    attempt = None
    if not done or notes:  # a chunk with nothing to train still records the repairs it made
        attempt = ledger.start_attempt(
            run.id,
            chunk=job.chunk,
            start_step=resume.step if resume else 0,
            end_step=job.end_step,
            resumed_from_step=resume.step if resume else None,
            prefect_flow_run_id=job.prefect_flow_run_id,
            prefect_task_run_id=job.prefect_task_run_id,
        )
        for note in notes:
            ledger.add_attempt_note(attempt.id, note)
    if done:
        # Already trained (perhaps by a process killed before it pruned): leave what the policy keeps.
        upload_missing(ledger, run, remote_url, fence)  # uploads an earlier attempt left unfinished
        if attempt is not None:
            ledger.add_attempt_note(attempt.id, f"nothing to train: checkpoint-{resume.step} is committed and verifies")
            ledger.finish_attempt(attempt.id, AttemptStatus.COMPLETED)
        apply_retention(ledger, run.id, settings.checkpoint)
        return None
    return AttemptPlan(
        attempt.id,
        attempt.attempt,
        resume.step if resume else None,
        str(resume.path) if resume else None,
        notes,
        [fence.run_id, fence.holder, fence.token] if fence else None,
        run.total_steps,
    )


def _unusable_newer(ledger: Ledger, run_id: int, resume_step: int, notes: list[str]) -> list[str]:
    """Why the attempt does not resume from newer checkpoints (found corrupt or partial earlier), if not said yet."""
    out = []
    for row in ledger.checkpoints(run_id, states=[CheckpointState.CORRUPT, CheckpointState.PARTIAL]):
        name = f"checkpoint-{row.step}"
        if row.step > resume_step and not any(re.search(rf"\b{name}\b", note) for note in notes):
            start = f"checkpoint-{resume_step}" if resume_step else "the start"
            out.append(f"{name} is {row.state} ({row.reason}); resuming from {start} instead")
    return out


def end_attempt(job: ChunkJob, plan: AttemptPlan, exc: BaseException | None) -> BaseException | None:
    """Record how the attempt ended; returns the exception to raise (disk-full explained), if any.

    Fenced like every write of the attempt: if the lease was taken over, a success raises
    LeaseLostError, and a failure is returned as it is (the new holder abandons the attempt row).
    """
    settings = settings_from_json(job.settings)
    ledger = _ledger(job)
    try:
        with _fenced(job, plan.lease):
            if exc is None:
                ledger.finish_attempt(plan.attempt_id, AttemptStatus.COMPLETED)
                # The checkpoint this attempt resumed from is no longer in use: let the policy see it.
                apply_retention(ledger, _run(ledger, job).id, settings.checkpoint)
                return None
            try:
                explained = _explain_disk_full(exc, settings, _run(ledger, job), ledger)
                ledger.finish_attempt(plan.attempt_id, AttemptStatus.FAILED, error=_describe_failure(explained))
            except LeaseLostError as lost:  # never hide the real failure behind the lost lease
                log.error("attempt %s failed and its lease is lost (%s): not recorded", plan.attempt_id, lost)
                return exc
            return explained
    finally:
        ledger.close()


def run_chunk(job: ChunkJob, launch: Launch | None = None) -> ChunkResult:
    """One attempt at a chunk: begin → launch (default: train in this process) → end."""
    t0 = time.monotonic()
    plan = begin_attempt(job)
    if plan is None:
        return ChunkResult(job.chunk, None, None, job.end_step, True, time.monotonic() - t0)
    try:
        (launch or train_attempt)(job, plan)
    except BaseException as exc:
        explained = end_attempt(job, plan, exc)
        if explained is exc:
            raise
        raise explained from exc
    end_attempt(job, plan, None)
    return ChunkResult(
        job.chunk, plan.attempt, plan.resume_step, job.end_step, False, time.monotonic() - t0, plan.notes
    )


def _run(ledger: Ledger, job: ChunkJob) -> RunRecord:
    run = ledger.get_run(job.run_name)
    if run is None:
        raise RuntimeError(f"run {job.run_name!r} is not in the ledger {job.ledger_url}")
    return run


def _describe_failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]


# Texts by which a disk-full failure shows in an exception chain or a child's output.
_DISK_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "InsufficientDiskError")
# Free space below which a failure during a save counts as disk full even when the exception does
# not say so (torch.save reports a full disk as "unexpected pos ..." or "file write failed").
_NEARLY_FULL_BYTES = 1 * 2**20


def _says_disk_full(exc: BaseException) -> bool:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(e) for text in _DISK_FULL_TEXTS):
            return True
        e = e.__cause__ or e.__context__
    return False


def _explain_disk_full(exc: BaseException, settings: Settings, run: RunRecord, ledger: Ledger) -> BaseException:
    """A save that failed on a full disk: quarantine the half-written checkpoint, say how much space is needed.

    Returns `exc` unchanged when the failure was not a full disk (or was already explained).
    """
    if isinstance(exc, InsufficientDiskError):
        return exc
    writing = ledger.checkpoints(run.id, states=[CheckpointState.WRITING])
    ckpt_root = settings.checkpoints_dir(run.name)
    free = free_bytes(ckpt_root)
    partial = max((dir_bytes(Path(r.path)) for r in writing if Path(r.path).exists()), default=0)
    committed = ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED])
    checkpoint_bytes = max([c.bytes for c in committed] + [partial])
    if not (_says_disk_full(exc) or (writing and free < max(checkpoint_bytes, _NEARLY_FULL_BYTES))):
        return exc
    reason = "disk full (ENOSPC) while saving"
    for row in writing:
        path = Path(row.path)
        if path.exists():
            quarantine(path, settings.quarantine_dir(run.name), reason)
        ledger.mark_checkpoint(run.id, row.step, CheckpointState.PARTIAL, reason)
    need = checkpoint_bytes + _min_free(settings)
    steps = ", ".join(f"checkpoint-{r.step}" for r in writing) or "a checkpoint"
    last = f"checkpoint-{committed[-1].step}" if committed else "the start (nothing committed yet)"
    return InsufficientDiskError(
        f"disk full while saving {steps} of run {run.name!r}: {format_bytes(free)} free in {ckpt_root}; a checkpoint "
        f"needs ~{format_bytes(checkpoint_bytes)} plus min_free_bytes {format_bytes(_min_free(settings))}: free at "
        f"least {format_bytes(max(need - free, 0))} more (so that {format_bytes(need)} are free; the partial save was "
        f"moved to {settings.quarantine_dir(run.name)}, which you may delete) and run again; it resumes from {last} "
        f"[{_describe_failure(exc)[:300]}]"
    )


def train_attempt(job: ChunkJob, plan: AttemptPlan) -> None:
    """Build a fresh trainer and train from the plan's resume point to the chunk end (any process, any rank).

    Under torchrun only rank 0 opens the ledger; the other ranks train from the parent's plan.
    """
    settings = settings_from_json(job.settings)
    faults.configure(settings.fault)
    distributed.init_process_group(settings.train.ddp_timeout_seconds)
    if not distributed.is_main_process():
        if plan.total_steps is None:
            raise RuntimeError("the attempt plan has no total_steps: ranks > 0 cannot train without the ledger")
        _train(
            settings, job, plan, plan.total_steps,
            lambda schedule: (_rank_callbacks(settings, job, schedule), contextlib.nullcontext()),
        )  # fmt: skip
        distributed.destroy_process_group()
        return
    ledger = _ledger(job)
    try:
        with _fenced(job, plan.lease):
            run = _run(ledger, job)

            def rank0(schedule: Schedule) -> tuple[list, contextlib.AbstractContextManager]:
                uploads = open_uploads(ledger, run, settings.checkpoint.remote_url, plan.lease)
                callbacks, committer = _callbacks(ledger, run, settings, job, plan, schedule, uploads)
                return callbacks, _background(uploads, committer)

            _train(settings, job, plan, run.total_steps, rank0)
    finally:
        ledger.close()
    distributed.destroy_process_group()


# Given the run's schedule: the trainer's callbacks, and what to run training inside (rank 0: the background
# commits and uploads, waited for when training ends or fails).
CallbackFactory = Callable[[Schedule], tuple[list, contextlib.AbstractContextManager]]


@contextlib.contextmanager
def _background(uploads: CheckpointUploads | None, committer: BackgroundCommitter) -> Iterator[None]:
    """Around training: the committer closes first (it submits uploads), then every upload must verify."""
    with uploading(uploads), committer:
        yield


def _train(settings: Settings, job: ChunkJob, plan: AttemptPlan, total_steps: int, make_callbacks: CallbackFactory) -> None:
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from ckptflow.modeling import lora_config
    from ckptflow.training import TENSORBOARD_DIR, TENSORBOARD_DIR_ENV, TrainerSpec, sft_config
    from ckptflow.warm import TrainerDatasets, chunk_inputs, keep_prepared, warm_key

    # Tokenizer and data stay loaded for the run's next chunk in this process (not under torchrun).
    keep = job.end_step < total_steps and distributed.world_size() == 1
    key = warm_key(settings, job.ledger_url, job.run_name)
    inputs = chunk_inputs(settings, key, keep=keep)
    tokenizer, data, prepared = inputs.tokenizer, inputs.data, inputs.prepared
    spec = TrainerSpec(settings.checkpoints_dir(job.run_name), total_steps, settings)
    # TensorBoard (report_to): every chunk appends to runs/<run>/tensorboard, not a dir beside the checkpoints.
    os.environ[TENSORBOARD_DIR_ENV] = str(settings.run_dir(job.run_name) / TENSORBOARD_DIR)
    schedule = schedule_for(settings, total_steps=total_steps, train_rows=data.train_rows)  # as `ckptflow plan`
    callbacks, background = make_callbacks(schedule)
    trainer = SFTTrainer(
        model=inputs.model,
        args=sft_config(spec, dataset_prepared=prepared is not None),
        train_dataset=data.train if prepared is None else prepared.train,
        eval_dataset=(data.eval if prepared is None else prepared.eval) if settings.checkpoint.evaluates else None,
        processing_class=tokenizer,
        peft_config=lora_config(settings.model),
        callbacks=callbacks,
    )
    if keep and prepared is None:  # the next chunks skip TRL's preparation (warm.py)
        keep_prepared(key, TrainerDatasets(trainer.train_dataset, trainer.eval_dataset))
    trainer.remove_callback(PrinterCallback)  # replaced by LogCallback: stdout stays clean
    if settings.fault.pause_at == "mid-save":
        _pause_mid_save(trainer)
    with background:  # the attempt succeeds only once every commit is durable and every upload verified
        trainer.train(resume_from_checkpoint=plan.resume_path)


def _pause_mid_save(trainer: Any) -> None:
    """Fault injection point `mid-save` (drills only): HF has written the model files, not yet the optimizer state."""
    save_optimizer = getattr(trainer, "_save_optimizer_and_scheduler", None)
    if save_optimizer is None:  # another transformers version: the point is simply never reached
        return

    def paused(output_dir: str) -> None:
        faults.pause("mid-save", trainer.state.global_step)
        save_optimizer(output_dir)

    trainer._save_optimizer_and_scheduler = paused


def _rank_callbacks(
    settings: Settings, job: ChunkJob, schedule: Schedule, last_checkpoint_bytes: Callable[[], int] = lambda: 0
) -> list:
    """Callbacks every rank runs: save/evaluate/stop on the run's schedule in step, wait for all ranks' files
    before a commit.

    Ranks > 0 don't read the ledger: their disk guard estimates from the parameter count (size 0 = unknown).
    """
    from ckptflow.training import AllRanksSavedCallback, DiskGuardCallback, LogCallback, PauseCallback, ScheduleCallback

    return [
        PauseCallback(),
        ScheduleCallback(schedule.save_points, schedule.eval_points, job.end_step),
        DiskGuardCallback(settings.checkpoints_dir(job.run_name), last_checkpoint_bytes, _min_free(settings)),
        LogCallback(log),
        AllRanksSavedCallback(distributed.wait_for_all_ranks),  # before CommitCallback: see its docstring
    ]


def _callbacks(
    ledger: Ledger,
    run: RunRecord,
    settings: Settings,
    job: ChunkJob,
    plan: AttemptPlan,
    schedule: Schedule,
    uploads: CheckpointUploads | None = None,
) -> tuple[list, BackgroundCommitter]:
    """Rank 0's callbacks and the committer they hand saves to; every ledger write is fenced by the plan's
    lease (a lost lease raises)."""
    from ckptflow.training import CommitCallback, FaultInjectionCallback, HeartbeatCallback

    ckpt_root = settings.checkpoints_dir(run.name)
    fence = plan.lease
    # The commits run on the committer's thread, through its own ledger (never this thread's connections).
    commit_ledger = CommitterLedger(ledger)
    committer = BackgroundCommitter(on_close=commit_ledger.close)
    committed = CommittedSize(max((c.bytes for c in ledger.checkpoints(run.id, [CheckpointState.COMMITTED])), default=0))

    def begin(step: int) -> None:
        commit_ledger.get().begin_checkpoint(run.id, step, str(checkpoint_dir(ckpt_root, step).resolve()), fence=fence)
        faults.pause("save-begun", step)

    def saved(step: int, epoch: float | None, metrics: dict) -> None:
        manifest = commit_checkpoint(
            commit_ledger.get(), run, settings.checkpoint, checkpoint_dir(ckpt_root, step), step,
            epoch=epoch, metrics=metrics, fence=fence,
            submit_upload=uploads.submit if uploads is not None else None,
            uploading=uploads.uploading if uploads is not None else frozenset,
        )  # fmt: skip
        committed.bytes = manifest.total_bytes
        log.info("committed checkpoint-%d (%d bytes, %s)", step, manifest.total_bytes, _metric_text(metrics, settings))

    callbacks = _rank_callbacks(settings, job, schedule, lambda: committed.bytes)
    callbacks.append(CommitCallback(committer, begin, saved))
    if fence is not None:
        callbacks.append(HeartbeatCallback(lambda: ledger.heartbeat(run.id, fence.holder, token=fence.token)))
    fault = settings.fault
    if fault.at_step is not None and plan.attempt <= fault.times and job.start_step < fault.at_step <= job.end_step:
        callbacks.insert(0, FaultInjectionCallback(fault.at_step, fault.mode))
    return callbacks, committer


def _metric_text(metrics: dict, settings: Settings) -> str:
    key = settings.checkpoint.metric_key
    return f"{key}={metrics[key]:.6g}" if key in metrics else "no eval metric"


def _min_free(settings: Settings) -> int:
    value = settings.checkpoint.min_free_bytes
    return DEFAULT_MIN_FREE_BYTES if value is None else value
