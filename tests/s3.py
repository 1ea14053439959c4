"""A real local S3 server for tests: moto in server mode, as a child process on loopback.

    with s3_server() as server:
        env = server.env()                 # AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, … (unique fake keys)
        bucket = server.create_bucket()    # a fresh, empty bucket

or, in tests, the fixtures `s3` (the session's server) and `s3_remote` (a fresh bucket's URL with
the server configured in the environment): `from tests.s3 import s3, s3_remote` in a test module,
or in tests/conftest.py to share one server across every module of the session.

The server listens on a free port of 127.0.0.1 only, keeps everything in memory, and is
killed (by its pid) when the block ends; the credentials are random per session, so a
message that leaks them is caught by a plain substring test. Clients (s3fs, boto3) find
the server the standard AWS way, through the environment — exactly as users configure it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
# The prefix inside each test bucket that `s3_remote` points at (objects: <prefix>/runs/<run>/…).
REMOTE_PREFIX = "team"
REGION = "us-east-1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class S3Unavailable(RuntimeError):
    """moto's server did not start (not installed, or it died)."""


@dataclass
class S3Server:
    port: int
    access_key: str
    secret_key: str = field(repr=False)
    log_path: Path | None = None
    _buckets: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point every SDK at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self):
        """A boto3 S3 client for this server (for test setup and inspection only)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
        )

    def create_bucket(self, prefix: str = "ckptflow-test") -> str:
        self._buckets += 1
        name = f"{prefix}-{self._buckets}-{secrets.token_hex(3)}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Every object key in the bucket under `prefix`, as the server lists them now."""
        paginator = self.client().get_paginator("list_objects_v2")
        return sorted(o["Key"] for page in paginator.paginate(Bucket=bucket, Prefix=prefix) for o in page.get("Contents", []))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise S3Unavailable(f"moto server exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise S3Unavailable(f"moto server not answering on {url} after {START_TIMEOUT_S}s")


@contextlib.contextmanager
def s3_server() -> Iterator[S3Server]:
    """Start `python -m moto.server` on a free loopback port; stop it (by pid) on exit."""
    port = free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="ckptflow-moto-"))
    log_path = log_dir / "moto.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    try:
        server = S3Server(
            port=port, access_key=f"AKIATEST{secrets.token_hex(6).upper()}", secret_key=secrets.token_urlsafe(30), log_path=log_path
        )
        _wait_ready(proc, server.endpoint, log_path)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log_path.unlink(missing_ok=True)
        log_dir.rmdir()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """The session's local S3 server (started on first use, stopped at the end)."""
    with s3_server() as server:
        yield server


@pytest.fixture
def s3_remote(s3: S3Server, monkeypatch) -> tuple[str, str]:
    """(`s3://<fresh bucket>/team`, bucket), with the server configured the standard AWS way in the environment."""
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    bucket = s3.create_bucket()
    return f"s3://{bucket}/{REMOTE_PREFIX}", bucket
