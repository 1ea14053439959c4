"""The object store behind `checkpoint.remote_url`: open it through fsspec, retry, stream, explain failures.

Any fsspec URL works (`s3://bucket/prefix`, `gs://…`, `file://…`, `memory://…`). Endpoints and
credentials come only from the standard environment of the store's SDK (for S3:
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`): they
are never arguments, never stored, and every message raised from here is redacted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from ckptflow.errors import BadInputError, CkptflowError
from ckptflow.secrets import mask_url, redact, registry

log = logging.getLogger(__name__)
T = TypeVar("T")

# Env var users set the remote with (named in every message that asks them to change it).
REMOTE_URL_ENV = "CKPTFLOW_CHECKPOINT__REMOTE_URL"
# Bytes moved per read/write: bounds memory per transfer; ≥ 5 MiB so S3 multipart parts are valid.
TRANSFER_BLOCK_SIZE = 8 * 2**20
# Attempts per file on transient errors (network, throttling, 5xx), and the first back-off (doubles).
TRANSFER_ATTEMPTS = 4
RETRY_FIRST_DELAY_S = 0.25
# Errors that retrying cannot fix: the path is wrong, access is denied, or the input is bad.
_PERMANENT_ERRORS = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    ValueError,
    TypeError,
    ImportError,
    CkptflowError,
)
# botocore's exceptions for missing or unusable credentials (matched by name: botocore is optional).
_CREDENTIAL_ERROR_NAMES = {"NoCredentialsError", "PartialCredentialsError", "NoRegionError"}
# Unreachable endpoints: botocore and s3fs have already retried these for ~10 s; retrying again multiplies that.
_ALREADY_RETRIED_NAMES = {"EndpointConnectionError", "ConnectTimeoutError"}


class RemoteConfigError(BadInputError):
    """The remote URL, bucket or credentials are wrong; the message says which setting to change."""


class RemoteUnavailableError(CkptflowError):
    """The object store could not be reached or kept failing after retries (a transient outage)."""


@dataclass(frozen=True)
class RemoteStore:
    """An opened remote: the fsspec filesystem and the root path inside it (no trailing slash)."""

    fs: Any  # fsspec.AbstractFileSystem
    root: str
    url: str  # as the user gave it, credentials masked: for messages

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts]) if self.root else "/".join(parts)

    @property
    def is_local(self) -> bool:
        """A local directory (file://): parents must be created; object stores have no directories."""
        from fsspec.implementations.local import LocalFileSystem

        return isinstance(self.fs, LocalFileSystem)

    def forget_listings(self) -> None:
        """Drop cached listings: another process (or machine) may have changed the remote since."""
        self.fs.invalidate_cache()


def open_store(remote_url: str) -> RemoteStore:
    """The filesystem for `remote_url`; RemoteConfigError when the URL or its backend is unusable."""
    import fsspec

    registry.add_environment()  # the SDK's keys, so `redact` masks them even outside the CLI
    shown = mask_url(remote_url) or ""
    if not remote_url or "://" not in remote_url:
        raise RemoteConfigError(
            f"remote URL {shown!r} is not a URL: set {REMOTE_URL_ENV} to e.g. s3://bucket/prefix or file:///path"
        )
    try:
        fs, root = fsspec.core.url_to_fs(remote_url)
    except ImportError as exc:
        raise RemoteConfigError(
            redact(
                f"remote URL {shown}: {exc}. Install the backend (for s3://: pip install 'ckptflow[s3]') "
                f"or change {REMOTE_URL_ENV}"
            )
        ) from None
    except ValueError as exc:
        raise RemoteConfigError(
            redact(f"remote URL {shown}: {exc}. Set {REMOTE_URL_ENV} to an fsspec URL: s3://bucket/prefix, gs://…, file:///path")
        ) from None
    root = root.rstrip("/")
    if not root.strip("/"):
        raise RemoteConfigError(f"remote URL {shown} names no bucket or directory: set {REMOTE_URL_ENV} to e.g. s3://bucket/prefix")
    return RemoteStore(fs=fs, root=root, url=shown)


def check_writable_root(store: RemoteStore) -> None:
    """Fail early, with what to change, when the bucket is missing (never create one: a typo would)."""
    with explain(store, "open"):
        if store.is_local:
            store.fs.makedirs(store.root, exist_ok=True)
            return
        split = getattr(store.fs, "split_path", None)
        if split is None:  # not a bucketed store (memory://, …): nothing to check
            return
        bucket = split(store.root)[0]
        if not store.fs.exists(bucket):
            raise RemoteConfigError(
                f"bucket {bucket!r} of {store.url} does not exist (or these credentials cannot see it): "
                f"create it, or change {REMOTE_URL_ENV}"
            )


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, _PERMANENT_ERRORS) or type(exc).__name__ in _CREDENTIAL_ERROR_NAMES | _ALREADY_RETRIED_NAMES:
        return False
    return isinstance(exc, Exception)


def with_retries(fn: Callable[[], T], what: str) -> T:
    """fn(), retried with exponential back-off on transient errors, TRANSFER_ATTEMPTS times in all."""
    delay = RETRY_FIRST_DELAY_S
    for attempt in range(1, TRANSFER_ATTEMPTS + 1):
        try:
            return fn()
        except Exception as exc:
            if not _is_transient(exc) or attempt == TRANSFER_ATTEMPTS:
                raise
            log.warning(
                "%s failed (attempt %d of %d), retrying in %.2fs: %s", what, attempt, TRANSFER_ATTEMPTS, delay, redact(str(exc))
            )
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


@contextlib.contextmanager
def explain(store: RemoteStore, action: str) -> Iterator[None]:
    """Turn backend errors into ckptflow's: bad settings → RemoteConfigError, outages → RemoteUnavailableError.

    FileNotFoundError passes through (callers decide whether missing means "not a copy").
    """
    try:
        yield
    except (CkptflowError, FileNotFoundError):
        raise
    except PermissionError as exc:
        raise RemoteConfigError(
            redact(
                f"{action} {store.url}: access denied ({exc}). Check the credentials in AWS_ACCESS_KEY_ID / "
                f"AWS_SECRET_ACCESS_KEY (or the bucket policy), or change {REMOTE_URL_ENV}"
            )
        ) from None
    except Exception as exc:
        if type(exc).__name__ in _CREDENTIAL_ERROR_NAMES:
            raise RemoteConfigError(
                redact(
                    f"{action} {store.url}: {exc}. Set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_DEFAULT_REGION "
                    "(and AWS_ENDPOINT_URL for an S3-compatible server)"
                )
            ) from None
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        where = f" (AWS_ENDPOINT_URL={endpoint})" if endpoint else ""
        raise RemoteUnavailableError(
            redact(
                f"{action} {store.url}{where} failed after retries: {type(exc).__name__}: {exc}. "
                "Check that the store is reachable (AWS_ENDPOINT_URL for an S3-compatible server)"
            )
        ) from None


def _copy_hashing(src: BinaryIO, dst: BinaryIO | None) -> tuple[str, int]:
    """Stream src into dst (or nowhere) block by block; (hex sha256, bytes) of what passed."""
    h = hashlib.sha256()
    size = 0
    while block := src.read(TRANSFER_BLOCK_SIZE):
        h.update(block)
        size += len(block)
        if dst is not None:
            dst.write(block)
    return h.hexdigest(), size


def put_file(store: RemoteStore, local_path: str, remote_path: str) -> tuple[str, int]:
    """Upload one file in blocks (with retries); (sha256, bytes) of what was sent."""

    def attempt() -> tuple[str, int]:
        if store.is_local:
            store.fs.makedirs(remote_path.rpartition("/")[0], exist_ok=True)
        with open(local_path, "rb") as src, store.fs.open(remote_path, "wb", block_size=TRANSFER_BLOCK_SIZE) as dst:
            return _copy_hashing(src, dst)

    return with_retries(attempt, f"upload of {remote_path}")


def get_file(store: RemoteStore, remote_path: str, local_path: str) -> tuple[str, int]:
    """Download one file in blocks (with retries), fsynced; (sha256, bytes) of what was received."""

    def attempt() -> tuple[str, int]:
        os.makedirs(os.path.dirname(local_path), exist_ok=True)
        with store.fs.open(remote_path, "rb", block_size=TRANSFER_BLOCK_SIZE) as src, open(local_path, "wb") as dst:
            result = _copy_hashing(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
            return result

    return with_retries(attempt, f"download of {remote_path}")


def hash_remote(store: RemoteStore, remote_path: str) -> tuple[str, int]:
    """(sha256, bytes) of a remote file, re-read in blocks (with retries)."""

    def attempt() -> tuple[str, int]:
        with store.fs.open(remote_path, "rb", block_size=TRANSFER_BLOCK_SIZE) as src:
            return _copy_hashing(src, None)

    return with_retries(attempt, f"read of {remote_path}")


def remote_size(store: RemoteStore, remote_path: str) -> int | None:
    """Size of a remote file, or None if there is none."""
    try:
        info = with_retries(lambda: store.fs.info(remote_path), f"stat of {remote_path}")
    except FileNotFoundError:
        return None
    if info.get("type") == "directory":
        return None
    return int(info["size"])


def read_bytes(store: RemoteStore, remote_path: str) -> bytes | None:
    """A small remote file's bytes (the manifest), or None if there is none."""
    try:
        return with_retries(lambda: store.fs.cat_file(remote_path), f"read of {remote_path}")
    except (FileNotFoundError, IsADirectoryError):
        return None


def write_bytes(store: RemoteStore, remote_path: str, data: bytes) -> None:
    """One small file in a single write (one PUT on S3: it appears whole or not at all)."""

    def attempt() -> None:
        if store.is_local:
            store.fs.makedirs(remote_path.rpartition("/")[0], exist_ok=True)
        store.fs.pipe_file(remote_path, data)

    with_retries(attempt, f"upload of {remote_path}")


def remove_file(store: RemoteStore, remote_path: str) -> bool:
    """Delete one remote file; False if it was not there."""
    try:
        with_retries(lambda: store.fs.rm_file(remote_path), f"delete of {remote_path}")
    except FileNotFoundError:
        return False
    return True


def files_under(store: RemoteStore, remote_dir: str) -> list[str]:
    """Every file strictly below `remote_dir/` (a sibling sharing the prefix, like checkpoint-40 for checkpoint-4, is not)."""
    prefix = remote_dir.rstrip("/") + "/"
    try:
        found = with_retries(lambda: store.fs.find(prefix), f"listing of {remote_dir}")
    except FileNotFoundError:
        return []
    norm = [p if p.startswith("/") or not prefix.startswith("/") else "/" + p for p in found]
    return sorted(p for p in norm if p.startswith(prefix))


__all__ = [
    "REMOTE_URL_ENV",
    "TRANSFER_BLOCK_SIZE",
    "RemoteConfigError",
    "RemoteStore",
    "RemoteUnavailableError",
    "check_writable_root",
    "explain",
    "files_under",
    "get_file",
    "hash_remote",
    "open_store",
    "put_file",
    "read_bytes",
    "remote_size",
    "remove_file",
    "with_retries",
    "write_bytes",
]
