"""Checkpoints on object storage: upload, verify, download, choose, delete.

Remote layout mirrors the home: `<remote_url>/runs/<run>/checkpoints/checkpoint-<step>/`,
holding the checkpoint's files and its manifest (integrity.MANIFEST_NAME). The manifest is
the remote commit marker: it is uploaded last, only after every file landed, and deleted
first, so a remote directory without a manifest (an interrupted upload or delete) is never
a copy. A copy counts only after re-reading it from the remote matches the manifest (size
and sha256 of every file) and the manifest matches the ledger's sha256.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar

from ckptflow.errors import CorruptCheckpointError
from ckptflow.integrity import MANIFEST_NAME, FileEntry, Manifest, checkpoint_step, read_manifest, verify_checkpoint
from ckptflow.paths import InvalidRunNameError, validate_run_name
from ckptflow.remote_fs import (
    REMOTE_URL_ENV,
    RemoteConfigError,
    RemoteStore,
    RemoteUnavailableError,
    check_writable_root,
    explain,
    files_under,
    get_file,
    hash_remote,
    open_store,
    put_file,
    read_bytes,
    remote_size,
    remove_file,
    write_bytes,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Remote directories, as in the home: <remote_url>/runs/<run>/checkpoints/checkpoint-<step>/.
RUNS_DIR = "runs"
CHECKPOINTS_DIR = "checkpoints"
# Remote directory of exports: <remote_url>/exports/<run>/ (as in the home).
EXPORTS_DIR = "exports"
# Files transferred or verified at once: several streams hide per-request latency of object stores.
TRANSFER_WORKERS = 4
# Prefix of the temporary directory a download is assembled in, beside its destination.
_DOWNLOAD_TMP_PREFIX = ".download-"


class RemoteVerifyError(CorruptCheckpointError):
    """A remote copy (just uploaded, or being downloaded) does not match its manifest."""


@dataclass(frozen=True)
class RemoteCopy:
    """A verified remote copy of one checkpoint."""

    url: str  # the remote checkpoint directory (credentials masked)
    step: int
    manifest_sha256: str  # sha256 of the manifest file: equals the ledger's checkpoints.manifest_sha256
    files: int  # files besides the manifest
    bytes: int  # their total size
    seconds: float  # upload plus verification


def checkpoint_url(remote_url: str, run_name: str, step: int) -> str:
    """`<remote_url>/runs/<run>/checkpoints/checkpoint-<step>` (as given, not masked: for code, not messages)."""
    return "/".join([remote_url.rstrip("/"), *_checkpoint_parts(run_name, step)])


def _checkpoint_parts(run_name: str, step: int) -> list[str]:
    """Path parts of a checkpoint below the remote root; refuses names that could leave it."""
    try:
        validate_run_name(run_name)  # the one grammar (ckptflow.paths): nothing can address outside the run's prefix
    except InvalidRunNameError as exc:
        raise RemoteConfigError(f"{exc} (it cannot address a remote checkpoint)") from None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise RemoteConfigError(f"checkpoint step {step!r} is not a non-negative integer")
    return [RUNS_DIR, run_name, CHECKPOINTS_DIR, f"checkpoint-{step}"]


def _checkpoint_dir(store: RemoteStore, run_name: str, step: int) -> str:
    return store.path(*_checkpoint_parts(run_name, step))


def _unsafe(rel: str) -> bool:
    p = PurePosixPath(rel)
    return p.is_absolute() or ".." in p.parts or rel in ("", ".") or "\\" in rel


def upload_checkpoint(local_dir: Path, remote_url: str, run_name: str, step: int) -> RemoteCopy:
    """Copy a committed checkpoint to the remote, manifest last, and verify it there; returns the copy.

    Steps: (1) read the local manifest (no manifest: not committed, refused); (2) delete a remote
    manifest left by an earlier upload, so the directory is not a copy while it changes; (3)
    stream every listed file, hashing what is sent — a local file that no longer matches its
    manifest stops the upload before the manifest; (4) write the manifest's exact bytes;
    (5) re-read the remote copy and check it against the manifest; on failure remove the
    manifest again (never leave a commit marker on a bad copy) and raise RemoteVerifyError.
    Idempotent: uploading again over a partial or complete copy rewrites it.
    """
    started = time.monotonic()
    local_dir = Path(local_dir)
    manifest_bytes, manifest = _local_manifest(local_dir, step)  # (1)
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    store = open_store(remote_url)
    remote_dir = _checkpoint_dir(store, run_name, step)
    check_writable_root(store)
    with explain(store, f"upload of checkpoint-{step} to"):
        remove_file(store, f"{remote_dir}/{MANIFEST_NAME}")  # (2)
        sent = _each_file(lambda e: put_file(store, str(local_dir / e.path), f"{remote_dir}/{e.path}"), manifest.files)  # (3)
        for entry, (sent_sha, sent_size) in zip(manifest.files, sent):
            if (sent_sha, sent_size) != (entry.sha256, entry.size):
                raise CorruptCheckpointError(
                    f"{local_dir.name}/{entry.path}: local file no longer matches its manifest "
                    f"(size {sent_size}, manifest says {entry.size}); not uploaded as a copy — verify the checkpoint"
                )
        write_bytes(store, f"{remote_dir}/{MANIFEST_NAME}", manifest_bytes)  # (4)
        problems = _verify(store, remote_dir, step, digest)  # (5)
        if problems:
            remove_file(store, f"{remote_dir}/{MANIFEST_NAME}")
            raise RemoteVerifyError(f"remote copy of checkpoint-{step} at {store.url} failed verification: " + "; ".join(problems))
    copy = RemoteCopy(
        url=f"{store.url.rstrip('/')}/{'/'.join(_checkpoint_parts(run_name, step))}",
        step=step,
        manifest_sha256=digest,
        files=len(manifest.files),
        bytes=manifest.total_bytes,
        seconds=time.monotonic() - started,
    )
    log.info("uploaded checkpoint-%d (%d files, %d bytes) to %s in %.2fs", step, copy.files, copy.bytes, copy.url, copy.seconds)
    return copy


def _local_manifest(local_dir: Path, step: int) -> tuple[bytes, Manifest]:
    """The manifest's exact bytes and parsed form; CorruptCheckpointError when it is missing, unreadable or for another step."""
    try:
        data = (local_dir / MANIFEST_NAME).read_bytes()
    except OSError:
        raise CorruptCheckpointError(
            f"{local_dir} has no {MANIFEST_NAME}: it is not a committed checkpoint, so it is not uploaded"
        ) from None
    manifest = read_manifest(local_dir)
    if manifest is None:
        raise CorruptCheckpointError(f"{local_dir}/{MANIFEST_NAME} is unreadable: not uploaded")
    unsafe = [e.path for e in manifest.files if _unsafe(e.path)]
    if unsafe:
        raise CorruptCheckpointError(f"{local_dir}/{MANIFEST_NAME} lists unsafe paths {unsafe}: not uploaded")
    dir_step = checkpoint_step(local_dir)
    if manifest.step != step or (dir_step is not None and dir_step != step):
        raise CorruptCheckpointError(
            f"{local_dir}: manifest is for step {manifest.step}, asked to upload it as checkpoint-{step}"
        )
    return data, manifest


def verify_remote(remote_url: str, run_name: str, step: int, expected_manifest_sha256: str | None = None) -> list[str]:
    """Problems of the remote copy, each naming the file; [] means it is intact and complete.

    Raises RemoteConfigError / RemoteUnavailableError when the remote cannot be read at all
    (an outage is not evidence that the copy is bad).
    """
    store = open_store(remote_url)
    remote_dir = _checkpoint_dir(store, run_name, step)
    with explain(store, f"verification of checkpoint-{step} at"):
        store.forget_listings()
        return _verify(store, remote_dir, step, expected_manifest_sha256)


def _verify(store: RemoteStore, remote_dir: str, step: int, expected_manifest_sha256: str | None) -> list[str]:
    name = f"checkpoint-{step}"
    manifest_bytes = read_bytes(store, f"{remote_dir}/{MANIFEST_NAME}")
    if manifest_bytes is None:
        return [f"{name}/{MANIFEST_NAME}: missing remote manifest (the upload did not finish: not a copy)"]
    problems: list[str] = []
    actual = hashlib.sha256(manifest_bytes).hexdigest()
    if expected_manifest_sha256 is not None and actual != expected_manifest_sha256:
        problems.append(
            f"{name}/{MANIFEST_NAME}: sha256 {actual[:12]}… differs from the ledger's {expected_manifest_sha256[:12]}…"
        )
    manifest = _parse_manifest(manifest_bytes)
    if manifest is None:
        return problems + [f"{name}/{MANIFEST_NAME}: unreadable remote manifest"]
    if manifest.step != step:
        problems.append(f"{name}/{MANIFEST_NAME}: manifest is for step {manifest.step}")
    found = _each_file(lambda e: _verify_file(store, remote_dir, name, e), manifest.files)
    return problems + [p for p in found if p]


def _verify_file(store: RemoteStore, remote_dir: str, name: str, entry: FileEntry) -> str | None:
    label = f"{name}/{entry.path}"
    if _unsafe(entry.path):
        return f"{label}: unsafe path in manifest"
    path = f"{remote_dir}/{entry.path}"
    size = remote_size(store, path)
    if size is None:
        return f"{label}: missing on the remote"
    if size != entry.size:
        return f"{label}: size {size} bytes on the remote, manifest says {entry.size}"
    if hash_remote(store, path)[0] != entry.sha256:
        return f"{label}: sha256 on the remote differs from the manifest (content changed)"
    return None


def _each_file(fn: Callable[[FileEntry], T], entries: tuple[FileEntry, ...]) -> list[T]:
    """[fn(entry) …] in manifest order, up to TRANSFER_WORKERS files at once, largest started first.

    Several streams hide per-request latency; memory stays bounded (workers × one block).
    """
    if len(entries) < 2:
        return [fn(e) for e in entries]
    order = sorted(range(len(entries)), key=lambda i: -entries[i].size)
    with ThreadPoolExecutor(min(TRANSFER_WORKERS, len(entries)), thread_name_prefix="ckptflow-remote") as pool:
        futures = {i: pool.submit(fn, entries[i]) for i in order}
        return [futures[i].result() for i in range(len(entries))]


def _parse_manifest(data: bytes) -> Manifest | None:
    try:
        return Manifest.from_json(json.loads(data))
    except (ValueError, KeyError, TypeError):
        return None


def download_checkpoint(
    remote_url: str, run_name: str, step: int, local_dir: Path, expected_manifest_sha256: str | None
) -> Path:
    """Fetch a remote copy into `local_dir` only if it verifies; returns `local_dir`.

    Steps: (1) an existing `local_dir` that verifies is kept as it is; any other existing one
    is refused (quarantine it first: nothing is overwritten); (2) check the remote manifest
    against the ledger's sha256; (3) download every listed file into a temporary directory
    beside `local_dir`, the manifest last; (4) verify that directory with the same check a
    local resume uses; (5) rename it into place. A copy that fails is removed, never placed:
    RemoteVerifyError names the files.
    """
    local_dir = Path(local_dir)
    if local_dir.exists():  # (1)
        problems = verify_checkpoint(local_dir, expected_manifest_sha256)
        if not problems:
            return local_dir
        raise CorruptCheckpointError(
            f"{local_dir} exists and does not verify ({'; '.join(problems)}): quarantine it before downloading"
        )
    store = open_store(remote_url)
    remote_dir = _checkpoint_dir(store, run_name, step)
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = local_dir.parent / f"{_DOWNLOAD_TMP_PREFIX}{local_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        with explain(store, f"download of checkpoint-{step} from"):
            store.forget_listings()
            manifest_bytes, manifest = _remote_manifest(store, remote_dir, step, expected_manifest_sha256)  # (2)
            tmp.mkdir()
            got_all = _each_file(lambda e: get_file(store, f"{remote_dir}/{e.path}", str(tmp / e.path)), manifest.files)  # (3)
            for entry, got in zip(manifest.files, got_all):
                if got != (entry.sha256, entry.size):
                    raise RemoteVerifyError(f"checkpoint-{step}/{entry.path}: downloaded bytes differ from the manifest")
            (tmp / MANIFEST_NAME).write_bytes(manifest_bytes)
        problems = verify_checkpoint(tmp, expected_manifest_sha256)  # (4)
        if problems:
            raise RemoteVerifyError(f"downloaded checkpoint-{step} failed verification: " + "; ".join(problems))
        _fsync_tree(tmp)
        os.replace(tmp, local_dir)  # (5)
        _fsync_dir(local_dir.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("downloaded checkpoint-%d from %s to %s", step, store.url, local_dir)
    return local_dir


def _remote_manifest(store: RemoteStore, remote_dir: str, step: int, expected: str | None) -> tuple[bytes, Manifest]:
    data = read_bytes(store, f"{remote_dir}/{MANIFEST_NAME}")
    if data is None:
        raise RemoteVerifyError(f"checkpoint-{step} at {store.url}: no remote manifest (not a copy)")
    actual = hashlib.sha256(data).hexdigest()
    if expected is not None and actual != expected:
        raise RemoteVerifyError(
            f"checkpoint-{step}/{MANIFEST_NAME} at {store.url}: sha256 {actual[:12]}… differs from the ledger's {expected[:12]}…"
        )
    manifest = _parse_manifest(data)
    if manifest is None or manifest.step != step:
        raise RemoteVerifyError(f"checkpoint-{step}/{MANIFEST_NAME} at {store.url}: unreadable or for another step")
    unsafe = [e.path for e in manifest.files if _unsafe(e.path)]
    if unsafe:
        raise RemoteVerifyError(f"checkpoint-{step}/{MANIFEST_NAME} at {store.url}: unsafe paths {unsafe}")
    return data, manifest


def _fsync_dir(path: Path) -> None:
    """Make a rename or new entries in `path` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every directory below root (the files were fsynced as they were written)."""
    for dirpath, _dirs, _files in os.walk(root, topdown=False):
        _fsync_dir(Path(dirpath))


def newest_verified_remote(remote_url: str, run_name: str, candidates: list[tuple[int, str | None]]) -> int | None:
    """The highest step among `candidates` (step, ledger manifest sha256) whose remote copy verifies, else None.

    Copies that fail are logged and skipped, so a corrupted newest copy falls back to the one
    before. An unreachable remote raises instead: an outage must not look like "no copy".
    """
    for step, expected in sorted(candidates, key=lambda c: c[0], reverse=True):
        problems = verify_remote(remote_url, run_name, step, expected)
        if not problems:
            return step
        log.warning("remote checkpoint-%d of run %s is not usable: %s", step, run_name, "; ".join(problems))
    return None


def remote_steps(remote_url: str, run_name: str) -> list[int]:
    """Steps whose remote directory holds a manifest (a finished upload), ascending; nothing is re-hashed.

    Cheap (one listing): for showing where checkpoints live. Before using a copy, verify it.
    """
    store = open_store(remote_url)
    _checkpoint_parts(run_name, 0)  # validates the name
    root = store.path(RUNS_DIR, run_name, CHECKPOINTS_DIR)
    with explain(store, f"listing of run {run_name} at"):
        store.forget_listings()
        steps = set()
        for path in files_under(store, root):
            parent, _, name = path.rpartition("/")
            step = checkpoint_step(Path(parent.rpartition("/")[2])) if name == MANIFEST_NAME else None
            if step is not None and parent.rpartition("/")[0] == root.rstrip("/"):
                steps.add(step)
    return sorted(steps)


def delete_remote(remote_url: str, run_name: str, step: int) -> int:
    """Remove the remote copy of one checkpoint, manifest first; returns the number of files removed.

    Only `<remote_url>/runs/<run>/checkpoints/checkpoint-<step>/` is touched (names that could
    address anything else are refused). Deleting the manifest first means an interrupted
    delete leaves a directory that is not a copy, never a copy missing files.
    """
    store = open_store(remote_url)
    remote_dir = _checkpoint_dir(store, run_name, step)
    with explain(store, f"delete of checkpoint-{step} at"):
        store.forget_listings()
        removed = int(remove_file(store, f"{remote_dir}/{MANIFEST_NAME}"))
        for path in files_under(store, remote_dir):
            removed += int(remove_file(store, path))
        if store.is_local:  # object stores have no directories to leave behind
            _remove_empty_dirs(store, remote_dir)
    return removed


def export_url(remote_url: str, run_name: str) -> str:
    """`<remote_url>/exports/<run>` (as given, not masked: for code, not messages)."""
    return "/".join([remote_url.rstrip("/"), *_export_parts(run_name)])


def _export_parts(run_name: str) -> list[str]:
    _checkpoint_parts(run_name, 0)  # refuses names that could leave the remote root
    return [EXPORTS_DIR, run_name]


def upload_export(local_dir: Path, remote_url: str, run_name: str, marker: str) -> RemoteCopy:
    """Copy an export directory to `<remote_url>/exports/<run>/`, the file `marker` (its provenance) last.

    Like a checkpoint upload: (1) delete the remote marker, so the directory is not an export
    while it changes; (2) upload every other file, and delete remote files the new export does
    not have (an earlier export of the run); (3) write the marker; (4) re-read every file from
    the remote and compare size and sha256 with what was sent — on a mismatch the marker is
    removed again and RemoteVerifyError raised. Returns the copy (step 0: exports have none).
    """
    started = time.monotonic()
    local_dir = Path(local_dir)
    marker_bytes = (local_dir / marker).read_bytes()
    names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file() and p.name != marker)
    store = open_store(remote_url)
    remote_dir = store.path(*_export_parts(run_name))
    check_writable_root(store)
    with explain(store, f"upload of the export of run {run_name} to"):
        store.forget_listings()
        remove_file(store, f"{remote_dir}/{marker}")  # (1)
        entries = tuple(FileEntry(name, (local_dir / name).stat().st_size, "") for name in names)
        sent = _each_file(lambda e: put_file(store, str(local_dir / e.path), f"{remote_dir}/{e.path}"), entries)  # (2)
        for stale in set(files_under(store, remote_dir)) - {f"{remote_dir}/{n}" for n in names}:
            remove_file(store, stale)
        write_bytes(store, f"{remote_dir}/{marker}", marker_bytes)  # (3)
        expected = [FileEntry(e.path, size, sha) for e, (sha, size) in zip(entries, sent)]
        expected.append(FileEntry(marker, len(marker_bytes), hashlib.sha256(marker_bytes).hexdigest()))
        problems = [p for p in _each_file(lambda e: _verify_file(store, remote_dir, "export", e), tuple(expected)) if p]  # (4)
        if problems:
            remove_file(store, f"{remote_dir}/{marker}")
            raise RemoteVerifyError(f"remote copy of the export of run {run_name} failed verification: " + "; ".join(problems))
    total = sum(e.size for e in expected)
    copy = RemoteCopy(
        url=f"{store.url.rstrip('/')}/{'/'.join(_export_parts(run_name))}",
        step=0,
        manifest_sha256=expected[-1].sha256,
        files=len(expected),
        bytes=total,
        seconds=time.monotonic() - started,
    )
    log.info("uploaded the export of run %s (%d files, %d bytes) to %s in %.2fs", run_name, copy.files, total, copy.url, copy.seconds)
    return copy


def delete_remote_export(remote_url: str, run_name: str, marker: str) -> int:
    """Remove `<remote_url>/exports/<run>/`, the marker (provenance) first; returns the number of files removed.

    For export retention: an interrupted delete leaves a directory without its marker, never
    an export missing files.
    """
    store = open_store(remote_url)
    remote_dir = store.path(*_export_parts(run_name))
    with explain(store, f"delete of the export of run {run_name} at"):
        store.forget_listings()
        removed = int(remove_file(store, f"{remote_dir}/{marker}"))
        for path in files_under(store, remote_dir):
            removed += int(remove_file(store, path))
        if store.is_local:
            _remove_empty_dirs(store, remote_dir)
    return removed


def _remove_empty_dirs(store: RemoteStore, remote_dir: str) -> None:
    for dirpath, _dirs, _files in os.walk(remote_dir, topdown=False):
        try:
            os.rmdir(dirpath)
        except OSError:  # not empty: something we did not write
            pass


__all__ = [
    "CHECKPOINTS_DIR",
    "REMOTE_URL_ENV",
    "RUNS_DIR",
    "RemoteConfigError",
    "RemoteCopy",
    "RemoteUnavailableError",
    "RemoteVerifyError",
    "EXPORTS_DIR",
    "checkpoint_url",
    "delete_remote",
    "delete_remote_export",
    "download_checkpoint",
    "export_url",
    "newest_verified_remote",
    "remote_steps",
    "upload_checkpoint",
    "upload_export",
    "verify_remote",
]
