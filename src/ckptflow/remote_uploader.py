"""Uploads off the training thread: a bounded queue and one worker thread.

Training commits a checkpoint and hands its upload here; it goes on training while the
worker uploads and verifies. Bounded: at most `max_pending` uploads are unfinished (queued
or running) at once, and `submit` blocks when that many are — so a slow remote slows
training down instead of piling up checkpoints that retention cannot delete yet. Before a
run reports `completed` it calls `drain`, which waits for every outstanding upload and
raises if any failed.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any

from ckptflow.errors import CkptflowError
from ckptflow.remote import RemoteCopy, upload_checkpoint

log = logging.getLogger(__name__)

# Unfinished uploads allowed at once (queued + running) before `submit` blocks.
DEFAULT_MAX_PENDING = 2
# What the worker calls; the signature of remote.upload_checkpoint.
Upload = Callable[[Path, str, str, int], RemoteCopy]


class UploadFailedError(CkptflowError):
    """One or more background uploads failed; the message lists them (step and reason)."""

    def __init__(self, failures: list[tuple[int, BaseException]]) -> None:
        self.failures = failures
        lines = "; ".join(f"checkpoint-{step}: {type(exc).__name__}: {exc}" for step, exc in failures)
        super().__init__(f"{len(failures)} checkpoint upload(s) failed: {lines}")


class BackgroundUploader:
    """One worker thread uploading checkpoints in submission order.

        with BackgroundUploader(max_pending=2) as uploader:
            future = uploader.submit(path, remote_url, run, step)   # returns at once (or blocks when full)
            ...
            copies = uploader.drain(timeout=600)                     # raises UploadFailedError
    """

    def __init__(self, max_pending: int = DEFAULT_MAX_PENDING, upload: Upload = upload_checkpoint) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self.max_pending = max_pending
        self._upload = upload
        self._slots = threading.BoundedSemaphore(max_pending)
        self._jobs: queue.SimpleQueue[tuple[Future, tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._outstanding: dict[Future, int] = {}  # future → step, until drained
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="ckptflow-uploader", daemon=True)
        self._worker.start()

    def submit(
        self, local_dir: Path, remote_url: str, run_name: str, step: int, *, timeout: float | None = None
    ) -> Future[RemoteCopy]:
        """Queue one upload; blocks while `max_pending` uploads are unfinished. TimeoutError if still full after `timeout`."""
        if self._closed:
            raise RuntimeError("the uploader is closed")
        if not self._slots.acquire(timeout=timeout):
            raise TimeoutError(f"{self.max_pending} uploads still unfinished after {timeout}s: checkpoint-{step} not queued")
        future: Future[RemoteCopy] = Future()
        with self._lock:
            self._outstanding[future] = step
        self._jobs.put((future, (Path(local_dir), remote_url, run_name, step)))
        return future

    @property
    def pending(self) -> int:
        """Unfinished uploads (queued or running)."""
        with self._lock:
            return sum(1 for f in self._outstanding if not f.done())

    def drain(self, timeout: float | None = None) -> list[RemoteCopy]:
        """Wait for every upload submitted so far; their copies in submission order.

        Raises TimeoutError if some are still running after `timeout` (they stay outstanding),
        and UploadFailedError listing every upload that failed (each is reported once).
        """
        with self._lock:
            futures = list(self._outstanding)
        _done, not_done = wait_futures(futures, timeout=timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} checkpoint upload(s) still running after {timeout}s")
        with self._lock:
            steps = [self._outstanding.pop(f) for f in futures]
        failures = [(step, f.exception()) for f, step in zip(futures, steps) if f.exception() is not None]
        if failures:
            raise UploadFailedError(failures)
        return [f.result() for f in futures]

    def close(self, timeout: float | None = None) -> list[RemoteCopy]:
        """Drain, then stop the worker. Idempotent."""
        try:
            return self.drain(timeout)
        finally:
            if not self._closed:
                self._closed = True
                self._jobs.put(None)
                self._worker.join(timeout)

    def __enter__(self) -> BackgroundUploader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # already failing: stop, but don't hide the original error behind an upload error
            try:
                self.close()
            except Exception as upload_exc:
                log.warning("while failing, background uploads also failed: %s", upload_exc)

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, args = job
            if not future.set_running_or_notify_cancel():
                self._slots.release()
                continue
            result, error = None, None
            try:
                result = self._upload(*args)
            except BaseException as exc:  # surfaced on drain, never lost in this thread
                error = exc
            # Free the slot before the future completes: whoever waits on it may submit at once.
            self._slots.release()
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)


__all__ = ["DEFAULT_MAX_PENDING", "BackgroundUploader", "UploadFailedError"]
