"""One attempt's uploads: every committed checkpoint goes to `checkpoint.remote_url` in the background,
and the ledger marks each copy once it verified (`checkpoints.remote_at`).

The training thread submits and records; the uploader's worker thread only uploads (it
never touches the ledger). Before the attempt reports success it calls `finish`, which
waits for every upload and raises UploadFailedError if one failed: the chunk fails and is
retried, its local commits stay, and the retry uploads what is still missing (`catch_up`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

from ckptflow.ledger import CheckpointState, Fence, Ledger, RunRecord
from ckptflow.remote import RemoteCopy
from ckptflow.remote_uploader import DEFAULT_MAX_PENDING, BackgroundUploader, UploadFailedError

log = logging.getLogger(__name__)

# Longest `finish` waits for outstanding uploads before failing the attempt (seconds).
DRAIN_TIMEOUT_S = 3600.0


class CheckpointUploads:
    """Uploads of one run's checkpoints during an attempt, and their ledger marks."""

    def __init__(
        self, ledger: Ledger, run: RunRecord, remote_url: str, fence: Fence | None, max_pending: int = DEFAULT_MAX_PENDING
    ) -> None:
        self._ledger, self._run, self._url, self._fence = ledger, run, remote_url, fence
        self._uploader = BackgroundUploader(max_pending=max_pending)
        self._futures: dict[int, Future[RemoteCopy]] = {}  # step → upload not recorded yet

    def submit(self, path: Path, step: int) -> None:
        """Upload a committed checkpoint in the background (blocks while the uploader is full)."""
        self.record_finished()
        self._futures[step] = self._uploader.submit(path, self._url, self._run.name, step)

    def catch_up(self) -> None:
        """Submit the run's committed checkpoints that are local but have no verified remote copy yet.

        Covers uploads a failed or killed attempt did not finish, and a remote configured later.
        """
        for row in self._ledger.checkpoints(self._run.id, [CheckpointState.COMMITTED]):
            if row.remote_at is None and row.step not in self._futures and Path(row.path).is_dir():
                log.info("checkpoint-%d has no verified remote copy yet: uploading it", row.step)
                self.submit(Path(row.path), row.step)

    def uploading(self) -> set[int]:
        """Steps whose upload is not recorded yet: retention must not delete them under the uploader."""
        self.record_finished()
        return set(self._futures)

    def record_finished(self) -> None:
        """Mark the verified copies of finished uploads in the ledger (failed ones stay, for `finish` to raise)."""
        for step, future in list(self._futures.items()):
            if future.done() and future.exception() is None:
                self._mark(step, future.result())
                del self._futures[step]

    def finish(self) -> None:
        """Wait for every upload and record it; UploadFailedError (a retryable failure) if any failed."""
        try:
            self._uploader.close(timeout=DRAIN_TIMEOUT_S)
        finally:
            self.record_finished()

    def abort(self) -> None:
        """The attempt is failing anyway: stop, record what did upload, log (not raise) upload failures."""
        try:
            self.finish()
        except (UploadFailedError, TimeoutError) as exc:
            log.warning("while the attempt failed, uploads also failed: %s", exc)

    def _mark(self, step: int, copy: RemoteCopy) -> None:
        if not self._ledger.mark_remote(self._run.id, step, copy.manifest_sha256, fence=self._fence):
            log.warning("checkpoint-%d changed while it was uploaded: its remote copy is not recorded", step)




def open_uploads(ledger: Ledger, run: RunRecord, remote_url: str, fence: Fence | None) -> CheckpointUploads | None:
    """The attempt's uploads, or None without a remote (then nothing is uploaded)."""
    return CheckpointUploads(ledger, run, remote_url, fence) if remote_url else None


@contextlib.contextmanager
def uploading(uploads: CheckpointUploads | None) -> Iterator[None]:
    """Around training: upload what earlier attempts left behind, then wait for every upload at the end.

    A training failure is raised as it is (uploads are stopped and logged); an upload failure
    after successful training raises UploadFailedError.
    """
    if uploads is None:
        yield
        return
    uploads.catch_up()
    try:
        yield
    except BaseException:
        uploads.abort()
        raise
    uploads.finish()




def upload_missing(ledger: Ledger, run: RunRecord, remote_url: str, fence: Fence | None) -> None:
    """Upload, now, every committed local checkpoint without a verified remote copy (no-op without a remote).

    For a chunk with nothing left to train whose uploads an earlier attempt did not finish:
    the run must not report completed with a checkpoint missing on the remote.
    """
    with uploading(open_uploads(ledger, run, remote_url, fence)):
        pass


__all__ = ["DRAIN_TIMEOUT_S", "CheckpointUploads", "open_uploads", "upload_missing", "uploading"]
