"""Checkpoint commits off the training thread: one worker thread per chunk runs each save's ledger and disk work.

The training thread hands every save to `BackgroundCommitter.submit` — the `writing` row when
HF is about to write, then hash + manifest + fsync + ledger commit + retention + upload once
it wrote (`commit_checkpoint`) — and trains on. It waits only when it must:

- `wait_for(step)`: before a save whose directory still has a job queued or running;
- `submit`: while `max_pending` jobs are unfinished (a slow disk slows training down instead
  of piling up checkpoints that retention cannot delete yet);
- `close`: at the chunk end (every commit durable before the chunk returns).

A job that fails stops the worker: later jobs are skipped (their directories stay without a
manifest, i.e. partial) and `raise_if_failed` — called from every step's callback — raises
the job's exception on the training thread, which fails the attempt exactly as a commit made
on the training thread would.

Crash safety does not depend on the thread: a checkpoint counts once its manifest and its
ledger row are durable, whenever the worker gets there; a kill before that leaves a
directory without a manifest (and a `writing` row, or none yet), which recovery quarantines.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ckptflow import faults
from ckptflow.integrity import Manifest, hash_files, write_manifest
from ckptflow.ledger import Fence, Ledger, RunRecord
from ckptflow.retention import apply_retention
from ckptflow.settings import CheckpointSettings

log = logging.getLogger(__name__)

# Unfinished jobs allowed at once (queued + running) before `submit` blocks: two saves behind
# (each save is two jobs, its `writing` row and its commit).
DEFAULT_MAX_PENDING = 4

Job = Callable[[], Any]


class BackgroundCommitter:
    """One worker thread running jobs in submission order; each job is tagged with its checkpoint step.

        committer = BackgroundCommitter()
        committer.submit(step, job)      # returns at once (blocks while max_pending jobs are unfinished)
        committer.raise_if_failed()      # on the training thread, every step
        committer.close()                # waits for every job; raises the first failure not raised yet
    """

    def __init__(self, max_pending: int = DEFAULT_MAX_PENDING, on_close: Callable[[], None] | None = None) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.max_pending = max_pending
        self._on_close = on_close  # runs on the worker thread after its last job (closes its ledger)
        self._jobs: queue.SimpleQueue[tuple[int, Job] | None] = queue.SimpleQueue()
        self._changed = threading.Condition()
        self._unfinished: list[int] = []  # steps of queued and running jobs, in order (guarded by _changed)
        self._error: BaseException | None = None
        self._raised = False  # the error reached the training thread already
        self._closed = False
        self._worker: threading.Thread | None = None  # started by the first submit

    # -- the training thread -------------------------------------------------------------
    def submit(self, step: int, job: Job) -> None:
        """Queue `job` for checkpoint `step`; waits while `max_pending` jobs are unfinished. Raises a failed job's error."""
        if self._closed:
            raise RuntimeError("the committer is closed")
        with self._changed:
            self._changed.wait_for(lambda: len(self._unfinished) < self.max_pending or self._error is not None)
            self.raise_if_failed()
            self._unfinished.append(step)
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="ckptflow-committer", daemon=True)
            self._worker.start()
        self._jobs.put((step, job))

    def wait_for(self, step: int) -> None:
        """Return once no job of checkpoint `step` is queued or running (its directory is free to write)."""
        with self._changed:
            self._changed.wait_for(lambda: step not in self._unfinished)
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        """Raise the first failed job's exception (once; later calls return)."""
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    @property
    def pending(self) -> int:
        """Unfinished jobs (queued or running)."""
        with self._changed:
            return len(self._unfinished)

    def close(self) -> None:
        """Wait for every job, stop the worker; raise the first failure unless it was raised already. Idempotent."""
        if not self._closed:
            self._closed = True
            if self._worker is not None:
                self._jobs.put(None)
                self._worker.join()
        self.raise_if_failed()

    def __enter__(self) -> BackgroundCommitter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing: finish what was queued (complete checkpoints still commit), but never
        # hide the original error behind a commit error.
        try:
            self.close()
        except Exception as commit_exc:
            log.warning("while failing, a background commit also failed: %s", commit_exc)

    # -- the worker ----------------------------------------------------------------------
    def _work(self) -> None:
        try:
            while (item := self._jobs.get()) is not None:
                step, job = item
                if self._error is None:  # after a failure, later jobs are skipped
                    try:
                        job()
                    except BaseException as exc:  # surfaced on the training thread, never lost here
                        log.error("background commit of checkpoint-%d failed: %s: %s", step, type(exc).__name__, exc)
                        self._error = exc
                with self._changed:
                    self._unfinished.remove(step)
                    self._changed.notify_all()
        finally:
            if self._on_close is not None:
                self._on_close()


@dataclass
class CommittedSize:
    """Bytes of the newest committed checkpoint, kept by the commits (the disk guard's estimate without a ledger read)."""

    bytes: int = 0


def commit_checkpoint(
    ledger: Ledger,
    run: RunRecord,
    ck: CheckpointSettings,
    path: Path,
    step: int,
    *,
    epoch: float | None,
    metrics: dict,
    fence: Fence | None,
    submit_upload: Callable[[Path, int], None] | None = None,
    uploading: Callable[[], Collection[int]] = frozenset,
) -> Manifest:
    """Make checkpoint `step` count: hash its files, write the manifest, commit the ledger row, upload, apply retention.

    Steps (each a fault-injection pause point for the kill drills): (1) hash and fsync every
    file; (2) check the lease is still held — a fenced-out writer never writes a manifest;
    (3) write the manifest; (4) commit the ledger row (fenced again, in its transaction);
    (5) hand the upload to the uploader; (6) apply retention. Returns the manifest.
    """
    faults.pause("files-written", step)
    files = hash_files(path)  # (1)
    faults.pause("files-hashed", step)
    if fence is not None:  # (2)
        ledger.heartbeat(run.id, fence.holder, token=fence.token)
    manifest, sha = write_manifest(path, step=step, metrics=metrics, settings_digest=run.fingerprint, files=files)  # (3)
    faults.pause("manifest-written", step)
    ledger.commit_checkpoint(
        run.id, step, epoch=epoch, metrics=metrics, bytes=manifest.total_bytes, manifest_sha256=sha, fence=fence
    )  # (4)
    faults.pause("commit-recorded", step)
    if submit_upload is not None:  # (5)
        submit_upload(path, step)
    decision = apply_retention(ledger, run.id, ck, uploading=uploading())  # (6)
    for pruned, reason in decision.prune.items():
        log.info("pruned checkpoint-%d: %s", pruned, reason)
    return manifest


class CommitterLedger:
    """The committer thread's own ledger (own engine and connections) on the training thread's database.

    Opened at the first job (on the worker thread), closed by the worker after its last
    (pass `close` as the committer's `on_close`). An in-memory SQLite database exists only on
    its one shared connection: that ledger is shared instead.
    """

    def __init__(self, shared: Ledger) -> None:
        self._shared = shared
        self._own: Ledger | None = None

    def get(self) -> Ledger:
        if self._own is None:
            self._own = self._shared if _in_memory(self._shared.url) else Ledger(self._shared.url, home=self._shared.home)
        return self._own

    def close(self) -> None:
        own, self._own = self._own, None
        if own is not None and own is not self._shared:
            own.close()


def _in_memory(url: str) -> bool:
    from sqlalchemy.engine import make_url

    from ckptflow.sqlite_url import sqlite_file

    return make_url(url).get_backend_name() == "sqlite" and sqlite_file(url) is None


__all__ = ["DEFAULT_MAX_PENDING", "BackgroundCommitter", "CommittedSize", "CommitterLedger", "commit_checkpoint"]
