"""Checkpoint integrity: manifests, verification and quarantine.

A checkpoint directory describes itself with a manifest (relative path, size and sha256
of every file, plus step, metrics and the settings digest). It is written last, to a
temporary name, fsynced and renamed into place, so a directory *with* a manifest was
completely written; a directory without one is partial. Nothing here deletes files:
broken checkpoints are moved to a quarantine directory with the reason next to them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from ckptflow.paths import contained

T = TypeVar("T")
R = TypeVar("R")

# File name of the manifest inside a checkpoint directory (its presence = complete).
MANIFEST_NAME = "ckptflow-manifest.json"
# Temporary name the manifest is written under before the atomic rename.
_MANIFEST_TMP_NAME = f".{MANIFEST_NAME}.tmp"
# Version of the manifest's JSON layout; bump when fields change meaning.
MANIFEST_FORMAT = 1
# File written inside a quarantined directory saying why it was moved there.
QUARANTINE_REASON_NAME = "QUARANTINE_REASON.txt"
# HF's checkpoint directory names: checkpoint-<global step>.
CHECKPOINT_DIR_RE = re.compile(r"checkpoint-(\d+)")
# Read size when hashing: large blocks keep hashing at disk speed (bytes).
HASH_BLOCK_SIZE = 8 * 2**20
# Files hashed at once. SHA-256 on one core (~1.2 GB/s with SHA extensions) is usually slower
# than the disk, and hashlib releases the GIL on large buffers, so threads add up across files.
HASH_WORKERS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the checkpoint directory, POSIX separators
    size: int  # bytes
    sha256: str  # hex digest


@dataclass(frozen=True)
class Manifest:
    step: int
    files: tuple[FileEntry, ...]
    metrics: dict[str, Any]
    settings_digest: str
    created_at: str  # ISO 8601, UTC

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "step": self.step,
            "created_at": self.created_at,
            "settings_digest": self.settings_digest,
            "metrics": self.metrics,
            "total_bytes": self.total_bytes,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        """Raises KeyError/TypeError/ValueError on a malformed document."""
        files = tuple(
            FileEntry(path=str(f["path"]), size=int(f["size"]), sha256=str(f["sha256"])) for f in data["files"]
        )
        metrics = data.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise TypeError("metrics is not an object")
        return cls(
            step=int(data["step"]),
            files=files,
            metrics=metrics,
            settings_digest=str(data.get("settings_digest", "")),
            created_at=str(data.get("created_at", "")),
        )


def sha256_file(path: Path, block_size: int = HASH_BLOCK_SIZE) -> str:
    """Hex sha256 of a file, read once in large blocks into one reused buffer."""
    return _hash_and_sync(Path(path), block_size, fsync=False)[0]


def _hash_and_sync(path: Path, block_size: int, *, fsync: bool) -> tuple[str, int]:
    """(hex sha256, bytes hashed) of a file; with `fsync`, its data is on disk when this returns."""
    h = hashlib.sha256()
    buf = bytearray(block_size)
    view = memoryview(buf)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest(), size


def _parallel(fn: Callable[[T], R], items: list[T], sizes: list[int]) -> list[R]:
    """[fn(item) ...] in order, run on up to HASH_WORKERS threads, largest items started first."""
    if len(items) < 2 or HASH_WORKERS < 2:
        return [fn(item) for item in items]
    order = sorted(range(len(items)), key=lambda i: -sizes[i])
    with ThreadPoolExecutor(min(HASH_WORKERS, len(items)), thread_name_prefix="ckptflow-hash") as pool:
        futures = {i: pool.submit(fn, items[i]) for i in order}
        return [futures[i].result() for i in range(len(items))]


def _fsync_dir(path: Path) -> None:
    """Make the directory's entries (new, renamed files) durable; raises OSError if that fails.

    A failed fsync means the data may not be on disk (EIO): the commit that relies on it must
    fail, not go on. Only platforms that cannot open or fsync directories at all are skipped
    (Windows; EINVAL = the filesystem does not support fsync on directories).
    """
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    """Every regular file below the directory except the manifest (and its temp file), sorted."""
    out = []
    for p in checkpoint_dir.rglob("*"):
        if p.is_file() and not (p.parent == checkpoint_dir and p.name in (MANIFEST_NAME, _MANIFEST_TMP_NAME)):
            out.append(p)
    return sorted(out, key=lambda p: p.relative_to(checkpoint_dir).as_posix())


def hash_files(checkpoint_dir: Path) -> tuple[FileEntry, ...]:
    """Hash and fsync every file of the checkpoint (several at once), then fsync the directories that hold them.

    When this returns the files' data and names are durable, so a manifest listing them may be written.
    """
    checkpoint_dir = Path(checkpoint_dir)
    files = _checkpoint_files(checkpoint_dir)
    sizes = [p.stat().st_size for p in files]
    hashed = _parallel(lambda p: _hash_and_sync(p, HASH_BLOCK_SIZE, fsync=True), files, sizes)
    dirs = {checkpoint_dir, *(p.parent for p in files)}
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        _fsync_dir(d)
    return tuple(FileEntry(p.relative_to(checkpoint_dir).as_posix(), size, digest) for p, (digest, size) in zip(files, hashed))


def write_manifest(
    checkpoint_dir: Path,
    *,
    step: int,
    metrics: dict[str, Any],
    settings_digest: str,
    files: tuple[FileEntry, ...] | None = None,
) -> tuple[Manifest, str]:
    """Atomically write the manifest. Returns (manifest, sha256 of the manifest file).

    Steps: (1) `files` as `hash_files` returned them (hashed now when not given): every file
    is durable before the manifest says the checkpoint is complete; (2) write the JSON to a
    temp name and fsync it; (3) os.replace it into place; (4) fsync the directory.
    """
    checkpoint_dir = Path(checkpoint_dir)
    entries = hash_files(checkpoint_dir) if files is None else files  # (1)
    manifest = Manifest(
        step=int(step),
        files=tuple(entries),
        metrics=dict(metrics),
        settings_digest=settings_digest,
        created_at=datetime.now(UTC).isoformat(),
    )
    payload = (json.dumps(manifest.to_json(), indent=2, sort_keys=True) + "\n").encode()
    tmp = checkpoint_dir / _MANIFEST_TMP_NAME
    with open(tmp, "wb") as f:  # (2)
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint_dir / MANIFEST_NAME)  # (3)
    _fsync_dir(checkpoint_dir)  # (4)
    return manifest, hashlib.sha256(payload).hexdigest()


def read_manifest(checkpoint_dir: Path) -> Manifest | None:
    """The directory's manifest, or None if it is missing or unparsable."""
    try:
        data = json.loads((Path(checkpoint_dir) / MANIFEST_NAME).read_bytes())
        return Manifest.from_json(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def manifest_sha256(checkpoint_dir: Path) -> str | None:
    """sha256 of the manifest file as stored (what the ledger records), or None if missing."""
    path = Path(checkpoint_dir) / MANIFEST_NAME
    try:
        return sha256_file(path)
    except OSError:
        return None


def _unsafe(rel: str) -> bool:
    p = PurePosixPath(rel)
    return p.is_absolute() or ".." in p.parts or rel in ("", ".")


def verify_checkpoint(checkpoint_dir: Path, expected_manifest_sha256: str | None = None) -> list[str]:
    """Problems found, each naming the file; [] means the checkpoint is intact.

    Checks the manifest exists, parses and (if given) hashes to what the ledger recorded,
    its step matches the directory name, and every listed file exists with the listed size
    and sha256. Files not in the manifest are ignored.
    """
    checkpoint_dir = Path(checkpoint_dir)
    name = checkpoint_dir.name
    if not checkpoint_dir.is_dir():
        return [f"{name}: directory {checkpoint_dir} is missing"]
    manifest_path = checkpoint_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        return [f"{name}/{MANIFEST_NAME}: missing manifest (the checkpoint was not completely written)"]
    manifest = read_manifest(checkpoint_dir)
    if manifest is None:
        return [f"{name}/{MANIFEST_NAME}: unreadable manifest"]
    problems: list[str] = []
    if expected_manifest_sha256 is not None:
        actual = sha256_file(manifest_path)
        if actual != expected_manifest_sha256:
            problems.append(
                f"{name}/{MANIFEST_NAME}: sha256 {actual[:12]}… differs from the ledger's "
                f"{expected_manifest_sha256[:12]}…"
            )
    dir_step = checkpoint_step(checkpoint_dir)
    if dir_step is not None and dir_step != manifest.step:
        problems.append(f"{name}/{MANIFEST_NAME}: manifest is for step {manifest.step}, directory for step {dir_step}")
    found = _parallel(lambda e: _verify_file(checkpoint_dir, e), list(manifest.files), [e.size for e in manifest.files])
    return problems + [p for file_problems in found for p in file_problems]


def _verify_file(checkpoint_dir: Path, entry: FileEntry) -> list[str]:
    label = f"{checkpoint_dir.name}/{entry.path}"
    if _unsafe(entry.path):
        return [f"{label}: unsafe path in manifest"]
    path = checkpoint_dir / entry.path
    if not path.is_file():
        return [f"{label}: missing"]
    size = path.stat().st_size
    if size != entry.size:
        return [f"{label}: size {size} bytes, manifest says {entry.size}"]
    if sha256_file(path) != entry.sha256:
        return [f"{label}: sha256 differs from the manifest (content changed)"]
    return []


def quarantine(checkpoint_dir: Path, quarantine_root: Path, reason: str) -> Path:
    """Move the directory to quarantine_root/<name>-<UTC timestamp> with the reason inside; returns the new path.

    Never deletes anything: os.replace on one filesystem, shutil.move (copy, then remove the
    source) across filesystems. The reason file is best effort (it cannot be written on a full disk).
    """
    checkpoint_dir = Path(checkpoint_dir)
    quarantine_root = Path(quarantine_root)
    if not checkpoint_dir.exists():
        raise FileNotFoundError(f"cannot quarantine {checkpoint_dir}: it does not exist")
    quarantine_root.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    dest = contained(quarantine_root, f"{checkpoint_dir.name}-{stamp}")
    n = 1
    while dest.exists() or dest.is_symlink():  # never onto anything already there
        dest = contained(quarantine_root, f"{checkpoint_dir.name}-{stamp}-{n}")
        n += 1
    try:
        os.replace(checkpoint_dir, dest)
    except OSError:
        shutil.move(str(checkpoint_dir), str(dest))
    _fsync_dir(checkpoint_dir.parent)
    if dest.is_dir():
        try:
            (dest / QUARANTINE_REASON_NAME).write_text(
                f"{reason}\n\nquarantined from {checkpoint_dir} at {datetime.now(UTC).isoformat()}\n", encoding="utf-8"
            )
        except OSError:  # e.g. the disk is full (the reason we are here): the move is what matters
            pass
    return dest


def checkpoint_step(path: Path) -> int | None:
    """`checkpoint-12` → 12; anything else → None."""
    m = CHECKPOINT_DIR_RE.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def checkpoint_dirs(checkpoints_dir: Path) -> list[Path]:
    """The `checkpoint-<N>` directories, sorted numerically by N (never as strings)."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def unmanifested_dirs(checkpoints_dir: Path) -> list[Path]:
    """`checkpoint-<N>` directories without a manifest (partial), sorted numerically by N."""
    return [p for p in checkpoint_dirs(checkpoints_dir) if not (p / MANIFEST_NAME).is_file()]


def dir_bytes(path: Path) -> int:
    """Total size of the regular files below path (symlinks not followed); a file's own size."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            if not os.path.islink(p):
                try:
                    total += os.stat(p).st_size
                except OSError:  # vanished while walking
                    pass
    return total


__all__ = [
    "MANIFEST_NAME",
    "QUARANTINE_REASON_NAME",
    "FileEntry",
    "Manifest",
    "checkpoint_dirs",
    "checkpoint_step",
    "dir_bytes",
    "hash_files",
    "manifest_sha256",
    "quarantine",
    "read_manifest",
    "sha256_file",
    "unmanifested_dirs",
    "verify_checkpoint",
    "write_manifest",
]
