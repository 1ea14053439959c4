"""Checkpoints on a real local S3 server (moto in server mode on loopback) through s3fs.

Real checkpoints of the tiny model (the `completed_home` run `base`) go up, the local copies
are deleted, and they come back bit-equal; a flipped byte in the newest remote copy makes the
choice fall back; a process killed with SIGKILL in the middle of an upload — watched on the
server, not timed — leaves a copy that is never treated as committed, and uploading again
completes it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ckptflow.integrity import MANIFEST_NAME, verify_checkpoint, write_manifest
from ckptflow.ledger import CheckpointState, Ledger
from ckptflow.remote import (
    RemoteConfigError,
    RemoteVerifyError,
    delete_remote,
    download_checkpoint,
    newest_verified_remote,
    remote_steps,
    upload_checkpoint,
    verify_remote,
)
from ckptflow.remote_fs import REMOTE_URL_ENV, TRANSFER_BLOCK_SIZE
from ckptflow.remote_uploader import BackgroundUploader
from tests.helpers import adapter_weights, max_abs_diff, settings_for
from tests.s3 import REMOTE_PREFIX as PREFIX
from tests.s3 import free_port  # fixtures s3, s3_remote: tests/conftest.py (one server per session: s3fs caches its clients)

pytestmark = pytest.mark.slow

RUN = "base"
# Longest a watched event may take before the test gives up (seconds; the events take far less).
WATCH_TIMEOUT_S = 60.0


def ckpt_keys(s3, bucket: str, step: int) -> list[str]:
    prefix = f"{PREFIX}/runs/{RUN}/checkpoints/checkpoint-{step}/"
    return [k.removeprefix(prefix) for k in s3.keys(bucket, prefix)]


def ledger_checkpoints(home: Path) -> dict[int, str]:
    """step → manifest sha256 of the completed run's committed checkpoints, from its real ledger."""
    settings = settings_for(home)
    ledger = Ledger(settings.ledger)
    try:
        run = ledger.get_run(RUN)
        return {c.step: c.manifest_sha256 for c in ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED])}
    finally:
        ledger.close()


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_real_checkpoints_go_up_and_come_back_bit_equal_after_the_home_is_gone(completed_home, s3, s3_remote):
    url, bucket = s3_remote
    committed = ledger_checkpoints(completed_home)
    assert len(committed) >= 2, committed
    root = settings_for(completed_home).checkpoints_dir(RUN)
    originals = {step: tree_bytes(root / f"checkpoint-{step}") for step in committed}
    weights = {step: adapter_weights(root / f"checkpoint-{step}") for step in committed}

    with BackgroundUploader(max_pending=1) as uploader:
        for step in committed:
            uploader.submit(root / f"checkpoint-{step}", url, RUN, step)
        copies = uploader.drain(timeout=300)
    assert {c.step: c.manifest_sha256 for c in copies} == committed
    for step in committed:
        assert ckpt_keys(s3, bucket, step) == sorted(originals[step])

    assert remote_steps(url, RUN) == sorted(committed)
    shutil.rmtree(completed_home)  # a new machine: same ledger rows, empty home
    newest = newest_verified_remote(url, RUN, list(committed.items()))
    assert newest == max(committed)
    for step, sha in committed.items():
        dest = download_checkpoint(url, RUN, step, root / f"checkpoint-{step}", sha)
        assert tree_bytes(dest) == originals[step]
        assert verify_checkpoint(dest, sha) == []
        assert max_abs_diff(adapter_weights(dest), weights[step]) == 0.0
    assert sorted(p.name for p in root.iterdir()) == sorted(f"checkpoint-{s}" for s in committed)  # no temp dirs left


def test_a_flipped_byte_in_the_newest_remote_copy_falls_back_to_the_one_before(completed_home, s3, s3_remote):
    url, bucket = s3_remote
    committed = ledger_checkpoints(completed_home)
    root = settings_for(completed_home).checkpoints_dir(RUN)
    for step in committed:
        upload_checkpoint(root / f"checkpoint-{step}", url, RUN, step)
    newest, previous = sorted(committed)[-1], sorted(committed)[-2]

    key = f"{PREFIX}/runs/{RUN}/checkpoints/checkpoint-{newest}/adapter_model.safetensors"
    client = s3.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    problems = verify_remote(url, RUN, newest, committed[newest])
    assert len(problems) == 1 and "adapter_model.safetensors" in problems[0], problems
    assert newest_verified_remote(url, RUN, list(committed.items())) == previous
    elsewhere = completed_home.parent / "elsewhere"
    with pytest.raises(RemoteVerifyError, match="adapter_model.safetensors"):
        download_checkpoint(url, RUN, newest, elsewhere / f"checkpoint-{newest}", committed[newest])
    assert not elsewhere.exists() or list(elsewhere.iterdir()) == []
    dest = download_checkpoint(url, RUN, previous, elsewhere / f"checkpoint-{previous}", committed[previous])
    assert tree_bytes(dest) == tree_bytes(root / f"checkpoint-{previous}")

    assert delete_remote(url, RUN, newest) == len(ckpt_keys(s3, bucket, previous))  # same files in each checkpoint
    assert ckpt_keys(s3, bucket, newest) == []
    assert ckpt_keys(s3, bucket, previous) != []


def _synthetic_checkpoint(root: Path, step: int, files: dict[str, int]) -> tuple[Path, str]:
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for name, size in files.items():
        with open(d / name, "wb") as f:
            for start in range(0, size, 2**20):
                f.write(os.urandom(min(2**20, size - start)))
    _, sha = write_manifest(d, step=step, metrics={}, settings_digest="kill-test")
    return d, sha


def _watch(condition, what: str) -> None:
    deadline = time.monotonic() + WATCH_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("over_an_old_copy", [False, True], ids=["fresh", "over-an-old-copy-of-the-step"])
def test_kill_9_during_an_upload_leaves_no_committed_copy_and_a_reupload_completes_it(tmp_path, s3, s3_remote, over_an_old_copy):
    url, bucket = s3_remote
    older, older_sha = _synthetic_checkpoint(tmp_path, 2, {"a-config.json": 100, "big.bin": 2 * TRANSFER_BLOCK_SIZE})
    newer, newer_sha = _synthetic_checkpoint(tmp_path, 4, {"a-config.json": 100, "big.bin": 8 * TRANSFER_BLOCK_SIZE})
    upload_checkpoint(older, url, RUN, 2)
    old_sha = None
    if over_an_old_copy:  # the same step uploaded before with other bytes (e.g. retrained after a fallback)
        old, old_sha = _synthetic_checkpoint(tmp_path / "old", 4, {"a-config.json": 100, "big.bin": 100})
        upload_checkpoint(old, url, RUN, 4)

    upload_in_child = "import sys; from ckptflow.remote import upload_checkpoint as u; u(sys.argv[1], sys.argv[2], 'base', 4)"
    child = subprocess.Popen(
        [sys.executable, "-c", upload_in_child, str(newer), url],
        env=os.environ.copy(),
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    client = s3.client()
    big_key = f"{PREFIX}/runs/{RUN}/checkpoints/checkpoint-4/big.bin"

    def big_file_half_sent() -> bool:
        """a-config.json landed and the multipart upload of big.bin has parts, but is not complete."""
        assert child.poll() is None, f"upload finished before it was killed: {child.stderr.read().decode()[-2000:]}"
        if "a-config.json" not in ckpt_keys(s3, bucket, 4):
            return False
        uploads = client.list_multipart_uploads(Bucket=bucket, Prefix=big_key).get("Uploads", [])
        return any(client.list_parts(Bucket=bucket, Key=big_key, UploadId=u["UploadId"]).get("Parts") for u in uploads)

    _watch(big_file_half_sent, "the child to be in the middle of big.bin")
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    assert child.returncode == -signal.SIGKILL

    left = ckpt_keys(s3, bucket, 4)
    assert left == ["a-config.json", "big.bin"] if over_an_old_copy else ["a-config.json"], left  # never the manifest
    for sha in (newer_sha, old_sha):  # neither the new copy nor the old one it was replacing
        assert verify_remote(url, RUN, 4, sha) == [
            f"checkpoint-4/{MANIFEST_NAME}: missing remote manifest (the upload did not finish: not a copy)"
        ]
    assert remote_steps(url, RUN) == [2]
    assert newest_verified_remote(url, RUN, [(2, older_sha), (4, newer_sha)]) == 2
    with pytest.raises(RemoteVerifyError, match="no remote manifest"):
        download_checkpoint(url, RUN, 4, tmp_path / "dl" / "checkpoint-4", newer_sha)

    copy = upload_checkpoint(newer, url, RUN, 4)
    assert copy.manifest_sha256 == newer_sha
    assert ckpt_keys(s3, bucket, 4) == ["a-config.json", "big.bin", MANIFEST_NAME]
    assert remote_steps(url, RUN) == [2, 4]
    assert newest_verified_remote(url, RUN, [(2, older_sha), (4, newer_sha)]) == 4
    dest = download_checkpoint(url, RUN, 4, tmp_path / "dl" / "checkpoint-4", newer_sha)
    assert tree_bytes(dest) == tree_bytes(newer)


def test_a_missing_bucket_is_bad_input_naming_it_and_never_created(tmp_path, s3, s3_remote):
    _, bucket = s3_remote
    local, sha = _synthetic_checkpoint(tmp_path, 2, {"a.json": 10})
    missing = f"{bucket}-missing"
    with pytest.raises(RemoteConfigError) as info:
        upload_checkpoint(local, f"s3://{missing}/{PREFIX}", RUN, 2)
    message = str(info.value)
    assert missing in message and REMOTE_URL_ENV in message
    assert s3.secret_key not in message and s3.access_key not in message
    assert missing not in [b["Name"] for b in s3.client().list_buckets()["Buckets"]]
    assert verify_remote(f"s3://{missing}/{PREFIX}", RUN, 2, sha) != []  # reading: simply no copy


def test_an_unreachable_endpoint_fails_after_retries_naming_it_without_credentials(tmp_path, s3, s3_remote):
    url, _ = s3_remote
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    script = (
        "import sys\n"
        "from ckptflow.remote import verify_remote\n"
        "try:\n"
        "    verify_remote(sys.argv[1], 'base', 2)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script, url],
        env={**os.environ, "AWS_ENDPOINT_URL": dead, "AWS_MAX_ATTEMPTS": "1"},  # botocore's own retries: keep the test short
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.stdout.startswith("RemoteUnavailableError"), out
    assert f"AWS_ENDPOINT_URL={dead}" in proc.stdout
    assert s3.secret_key not in out and s3.access_key not in out
    assert time.monotonic() - started < 120
