"""Remote checkpoint copies on real fsspec filesystems: file:// (a directory) and memory://.

Checkpoints are real directories of random bytes with manifests written by
integrity.write_manifest; the remote is read back through fsspec, never inspected by mocks.
"""

from __future__ import annotations

import hashlib
import os
import threading
import tracemalloc
import uuid
from pathlib import Path

import fsspec
import pytest

from ckptflow.errors import BadInputError, CorruptCheckpointError
from ckptflow.integrity import MANIFEST_NAME, verify_checkpoint, write_manifest
from ckptflow.remote import (
    RemoteConfigError,
    RemoteVerifyError,
    checkpoint_url,
    delete_remote,
    download_checkpoint,
    newest_verified_remote,
    remote_steps,
    upload_checkpoint,
    verify_remote,
)
from ckptflow.remote_fs import REMOTE_URL_ENV, TRANSFER_BLOCK_SIZE, RemoteUnavailableError, explain, open_store, with_retries
from ckptflow.remote_uploader import BackgroundUploader, UploadFailedError

RUN = "demo-run"
# A fake checkpoint: relative path → size in bytes (one file spans several transfer blocks' worth of tests below).
FILES = {"adapter_model.safetensors": 70_000, "optimizer.pt": 5_000, "trainer_state.json": 300, "sub/rng_state.pth": 17}


def make_checkpoint(root: Path, step: int, files: dict[str, int] = FILES) -> tuple[Path, str]:
    """A committed checkpoint directory of random bytes; (its path, sha256 of its manifest)."""
    d = root / f"checkpoint-{step}"
    for rel, size in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(os.urandom(size))
    _, sha = write_manifest(d, step=step, metrics={"eval_loss": 1.0 / (step + 1)}, settings_digest="test")
    return d, sha


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(params=["file", "memory"])
def remote_url(request, tmp_path):
    """A fresh, empty remote: a local directory, or a unique prefix of fsspec's in-memory store."""
    if request.param == "file":
        url = f"file://{tmp_path / 'bucket'}/prefix"
        yield url
        return
    url = f"memory://ckptflow-test-{uuid.uuid4().hex}/prefix"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root.split("/prefix")[0]):
        fs.rm(root.split("/prefix")[0], recursive=True)


def remote_fs(url: str, run: str, step: int):
    """(fs, path) of a remote checkpoint directory, for tampering with it as another process would."""
    return fsspec.core.url_to_fs(checkpoint_url(url, run, step))


def remote_files(url: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return sorted(p.removeprefix("/").removeprefix(root.lstrip("/")) for p in fs.find(root)) if fs.exists(root) else []


def test_round_trip_upload_verify_download_is_bit_equal(tmp_path, remote_url):
    local, sha = make_checkpoint(tmp_path / "home", 4)
    copy = upload_checkpoint(local, remote_url, RUN, 4)
    assert (copy.step, copy.manifest_sha256, copy.files, copy.bytes) == (4, sha, len(FILES), sum(FILES.values()))
    assert copy.url.endswith(f"/prefix/runs/{RUN}/checkpoints/checkpoint-4")
    assert remote_files(remote_url) == sorted(f"/runs/{RUN}/checkpoints/checkpoint-4/{p}" for p in [*FILES, MANIFEST_NAME])
    assert verify_remote(remote_url, RUN, 4, sha) == []

    dest = tmp_path / "other-home" / "checkpoint-4"
    assert download_checkpoint(remote_url, RUN, 4, dest, sha) == dest
    assert tree_bytes(dest) == tree_bytes(local)
    assert verify_checkpoint(dest, sha) == []
    assert [p.name for p in dest.parent.iterdir()] == ["checkpoint-4"]  # no temp dir left


@pytest.mark.parametrize("victim", ["adapter_model.safetensors", "sub/rng_state.pth"])
def test_flipped_byte_is_named_and_never_downloaded(tmp_path, remote_url, victim):
    local, sha = make_checkpoint(tmp_path / "home", 4)
    upload_checkpoint(local, remote_url, RUN, 4)
    fs, path = remote_fs(remote_url, RUN, 4)
    data = bytearray(fs.cat_file(f"{path}/{victim}"))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(f"{path}/{victim}", bytes(data))

    problems = verify_remote(remote_url, RUN, 4, sha)
    assert len(problems) == 1 and f"checkpoint-4/{victim}" in problems[0] and "sha256" in problems[0]
    dest = tmp_path / "other-home" / "checkpoint-4"
    with pytest.raises(RemoteVerifyError, match=victim):
        download_checkpoint(remote_url, RUN, 4, dest, sha)
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []


@pytest.mark.parametrize(
    "tamper, expected",
    [
        ("drop-file", "optimizer.pt: missing on the remote"),
        ("truncate", "optimizer.pt: size 4999 bytes on the remote, manifest says 5000"),
        ("ledger-sha", "differs from the ledger's"),
    ],
)
def test_verify_remote_names_each_kind_of_damage(tmp_path, remote_url, tamper, expected):
    local, sha = make_checkpoint(tmp_path / "home", 2)
    upload_checkpoint(local, remote_url, RUN, 2)
    fs, path = remote_fs(remote_url, RUN, 2)
    if tamper == "drop-file":
        fs.rm_file(f"{path}/optimizer.pt")
    elif tamper == "truncate":
        fs.pipe_file(f"{path}/optimizer.pt", fs.cat_file(f"{path}/optimizer.pt")[:-1])
    else:
        sha = "0" * 64
    problems = verify_remote(remote_url, RUN, 2, sha)
    assert any(expected in p for p in problems), problems


def test_partial_upload_without_manifest_is_not_a_copy_and_reupload_completes_it(tmp_path, remote_url):
    older, older_sha = make_checkpoint(tmp_path / "home", 2)
    newer, newer_sha = make_checkpoint(tmp_path / "home", 4)
    upload_checkpoint(older, remote_url, RUN, 2)
    # What an upload killed before its manifest leaves: some files of checkpoint-4, no manifest.
    fs, path = remote_fs(remote_url, RUN, 4)
    fs.makedirs(path, exist_ok=True)
    fs.put_file(str(newer / "adapter_model.safetensors"), f"{path}/adapter_model.safetensors")

    assert verify_remote(remote_url, RUN, 4, newer_sha) == [
        f"checkpoint-4/{MANIFEST_NAME}: missing remote manifest (the upload did not finish: not a copy)"
    ]
    assert newest_verified_remote(remote_url, RUN, [(2, older_sha), (4, newer_sha)]) == 2
    with pytest.raises(RemoteVerifyError, match="no remote manifest"):
        download_checkpoint(remote_url, RUN, 4, tmp_path / "dl" / "checkpoint-4", newer_sha)

    upload_checkpoint(newer, remote_url, RUN, 4)
    assert verify_remote(remote_url, RUN, 4, newer_sha) == []
    assert newest_verified_remote(remote_url, RUN, [(2, older_sha), (4, newer_sha)]) == 4


def test_reupload_replaces_a_different_copy_of_the_same_step(tmp_path, remote_url):
    first, first_sha = make_checkpoint(tmp_path / "a", 6)
    second, second_sha = make_checkpoint(tmp_path / "b", 6, {"adapter_model.safetensors": 1234, "other.bin": 99})
    upload_checkpoint(first, remote_url, RUN, 6)
    upload_checkpoint(second, remote_url, RUN, 6)
    assert verify_remote(remote_url, RUN, 6, second_sha) == []
    assert any("differs from the ledger's" in p for p in verify_remote(remote_url, RUN, 6, first_sha))
    dest = tmp_path / "dl" / "checkpoint-6"
    download_checkpoint(remote_url, RUN, 6, dest, second_sha)
    assert sorted(tree_bytes(dest)) == sorted(["adapter_model.safetensors", "other.bin", MANIFEST_NAME])


def test_newest_verified_remote_falls_back_past_every_bad_copy(tmp_path, remote_url):
    shas = {}
    for step in (2, 4, 6):
        local, shas[step] = make_checkpoint(tmp_path / "home", step)
        upload_checkpoint(local, remote_url, RUN, step)
    candidates = [(2, shas[2]), (6, shas[6]), (4, shas[4])]  # any order: the newest is chosen by step
    assert newest_verified_remote(remote_url, RUN, candidates) == 6

    fs, path = remote_fs(remote_url, RUN, 6)
    data = bytearray(fs.cat_file(f"{path}/optimizer.pt"))
    data[0] ^= 0xFF
    fs.pipe_file(f"{path}/optimizer.pt", bytes(data))
    assert newest_verified_remote(remote_url, RUN, candidates) == 4
    assert newest_verified_remote(remote_url, RUN, [(2, shas[2]), (4, "f" * 64), (6, shas[6])]) == 2
    assert newest_verified_remote(remote_url, RUN, [(8, None), (6, shas[6])]) is None
    assert newest_verified_remote(remote_url, RUN, []) is None


def test_delete_removes_manifest_and_files_but_not_a_sibling_sharing_the_prefix(tmp_path, remote_url):
    for step in (4, 40):
        local, _ = make_checkpoint(tmp_path / "home", step)
        upload_checkpoint(local, remote_url, RUN, step)
    assert delete_remote(remote_url, RUN, 4) == len(FILES) + 1
    left = remote_files(remote_url)
    assert left == sorted(f"/runs/{RUN}/checkpoints/checkpoint-40/{p}" for p in [*FILES, MANIFEST_NAME])
    assert verify_remote(remote_url, RUN, 4) != []
    assert delete_remote(remote_url, RUN, 4) == 0  # idempotent


@pytest.mark.parametrize(
    "run_name, step",
    [
        ("../other", 4),
        ("a/b", 4),
        ("", 4),
        (".hidden", 4),
        ("a..b", 4),
        ("x" * 101, 4),
        (RUN, -1),
        (RUN, "4/../../.."),
        (RUN, True),
        (RUN, 1.5),
    ],
)
def test_delete_refuses_anything_but_one_checkpoint_directory(tmp_path, remote_url, run_name, step):
    local, _ = make_checkpoint(tmp_path / "home", 4)
    upload_checkpoint(local, remote_url, RUN, 4)
    before = remote_files(remote_url)
    with pytest.raises(RemoteConfigError) as info:
        delete_remote(remote_url, run_name, step)
    assert isinstance(info.value, BadInputError)
    assert remote_files(remote_url) == before


def test_upload_refuses_an_uncommitted_or_changed_checkpoint(tmp_path, remote_url):
    partial = tmp_path / "home" / "checkpoint-2"
    partial.mkdir(parents=True)
    (partial / "adapter_model.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(CorruptCheckpointError, match="not a committed checkpoint"):
        upload_checkpoint(partial, remote_url, RUN, 2)

    local, _ = make_checkpoint(tmp_path / "home", 4)
    with pytest.raises(CorruptCheckpointError, match="manifest is for step 4"):
        upload_checkpoint(local, remote_url, RUN, 5)
    (local / "trainer_state.json").write_bytes(b"{}")  # changed after its manifest was written
    with pytest.raises(CorruptCheckpointError, match="trainer_state.json: local file no longer matches"):
        upload_checkpoint(local, remote_url, RUN, 4)
    assert not any(p.endswith(MANIFEST_NAME) for p in remote_files(remote_url))


def test_download_keeps_a_good_local_copy_and_refuses_to_overwrite_a_bad_one(tmp_path, remote_url):
    local, sha = make_checkpoint(tmp_path / "home", 4)
    upload_checkpoint(local, remote_url, RUN, 4)
    before = tree_bytes(local)
    assert download_checkpoint(remote_url, RUN, 4, local, sha) == local
    (local / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match="quarantine it"):
        download_checkpoint(remote_url, RUN, 4, local, sha)
    assert (local / "optimizer.pt").read_bytes() == b"garbage"
    assert tree_bytes(local).keys() == before.keys()


def test_upload_streams_in_blocks_with_bounded_memory(tmp_path):
    size = 6 * TRANSFER_BLOCK_SIZE + 123
    local, sha = make_checkpoint(tmp_path / "home", 2, {"big.bin": size, "small.json": 10})
    url = f"file://{tmp_path / 'remote'}"
    tracemalloc.start()
    try:
        upload_checkpoint(local, url, RUN, 2)
        dest = download_checkpoint(url, RUN, 2, tmp_path / "dl" / "checkpoint-2", sha)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * TRANSFER_BLOCK_SIZE, f"peak {peak} bytes for a {size}-byte file"
    assert hashlib.sha256((dest / "big.bin").read_bytes()).digest() == hashlib.sha256((local / "big.bin").read_bytes()).digest()


@pytest.mark.parametrize(
    "url, mentions",
    [
        ("not a url", REMOTE_URL_ENV),
        ("nosuchproto://bucket/x", "Protocol not known"),
        ("gs://bucket/x", "pip install"),
        ("s3://", "names no bucket"),
        ("memory://", "names no bucket"),
    ],
)
def test_unusable_remote_url_is_bad_input_naming_what_to_change(tmp_path, url, mentions):
    local, sha = make_checkpoint(tmp_path / "home", 2)
    for call in (lambda: upload_checkpoint(local, url, RUN, 2), lambda: verify_remote(url, RUN, 2, sha)):
        with pytest.raises(RemoteConfigError) as info:
            call()
        assert isinstance(info.value, BadInputError)
        assert mentions in str(info.value) and REMOTE_URL_ENV in str(info.value)


def test_transient_errors_are_retried_and_permanent_ones_are_not():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert with_retries(flaky, "test") == "ok" and len(calls) == 3
    calls.clear()

    def denied():
        calls.append(1)
        raise PermissionError("AccessDenied")

    with pytest.raises(PermissionError):
        with_retries(denied, "test")
    assert len(calls) == 1


# --- the background uploader ---------------------------------------------------------------


class GatedUpload:
    """The real upload, held at a gate until the test opens it; records what started."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started: list[int] = []

    def __call__(self, local_dir, remote_url, run_name, step):
        self.started.append(step)
        assert self.gate.wait(30), "gate never opened"
        return upload_checkpoint(local_dir, remote_url, run_name, step)


def test_uploader_is_bounded_and_drain_waits_for_every_upload(tmp_path, remote_url):
    checkpoints = {step: make_checkpoint(tmp_path / "home", step) for step in (2, 4, 6)}
    upload = GatedUpload()
    with BackgroundUploader(max_pending=2, upload=upload) as uploader:
        futures = [uploader.submit(checkpoints[s][0], remote_url, RUN, s) for s in (2, 4)]
        assert uploader.pending == 2
        with pytest.raises(TimeoutError, match="checkpoint-6 not queued"):
            uploader.submit(checkpoints[6][0], remote_url, RUN, 6, timeout=0.2)
        assert not any(f.done() for f in futures)
        with pytest.raises(TimeoutError, match="still running"):
            uploader.drain(timeout=0.1)
        upload.gate.set()
        futures.append(uploader.submit(checkpoints[6][0], remote_url, RUN, 6, timeout=30))
        copies = uploader.drain(timeout=60)
        assert [c.step for c in copies] == [2, 4, 6] and uploader.pending == 0
        assert [f.result().manifest_sha256 for f in futures] == [checkpoints[s][1] for s in (2, 4, 6)]
    assert upload.started == [2, 4, 6]
    for step, (_, sha) in checkpoints.items():
        assert verify_remote(remote_url, RUN, step, sha) == []


def test_uploader_surfaces_every_failure_on_drain_once(tmp_path, remote_url):
    good, _ = make_checkpoint(tmp_path / "home", 2)
    partial = tmp_path / "home" / "checkpoint-4"
    partial.mkdir()
    uploader = BackgroundUploader(max_pending=1)
    try:
        ok = uploader.submit(good, remote_url, RUN, 2)
        bad = uploader.submit(partial, remote_url, RUN, 4)
        with pytest.raises(UploadFailedError, match="checkpoint-4: CorruptCheckpointError") as info:
            uploader.drain(timeout=60)
        assert [step for step, _ in info.value.failures] == [4]
        assert ok.result().step == 2 and isinstance(bad.exception(), CorruptCheckpointError)
        assert uploader.drain(timeout=5) == []  # reported once, then forgotten
    finally:
        uploader.close(timeout=5)
    with pytest.raises(RuntimeError, match="closed"):
        uploader.submit(good, remote_url, RUN, 2)


def test_backend_errors_never_carry_credentials_into_messages(monkeypatch, tmp_path):
    secret = "wJalrXUtnFEMI-test-secret-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = open_store(f"file://{tmp_path}")
    cases = [
        (RuntimeError(f"signature for {secret} mismatch"), RemoteUnavailableError),
        (PermissionError(f"denied for {secret}"), RemoteConfigError),
    ]
    for raised, expected in cases:
        with pytest.raises(expected) as info:
            with explain(store, "upload to"):
                raise raised
        assert secret not in str(info.value) and "***" in str(info.value)


def test_manifests_listing_paths_outside_the_checkpoint_are_refused_both_ways(tmp_path, remote_url):
    import json

    local, _ = make_checkpoint(tmp_path / "home", 4)
    (tmp_path / "home" / "outside.txt").write_text("not part of the checkpoint")
    doc = json.loads((local / MANIFEST_NAME).read_text())
    doc["files"].append({"path": "../outside.txt", "size": 26, "sha256": "0" * 64})
    (local / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(CorruptCheckpointError, match="unsafe paths"):
        upload_checkpoint(local, remote_url, RUN, 4)

    fs, path = remote_fs(remote_url, RUN, 4)  # the same manifest planted on the remote by someone else
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(f"{path}/{MANIFEST_NAME}", json.dumps(doc).encode())
    assert "checkpoint-4/../outside.txt: unsafe path in manifest" in verify_remote(remote_url, RUN, 4)
    with pytest.raises(RemoteVerifyError, match="unsafe paths"):
        download_checkpoint(remote_url, RUN, 4, tmp_path / "dl" / "checkpoint-4", None)
    assert not (tmp_path / "dl" / "outside.txt").exists()


def test_remote_steps_lists_finished_uploads_only(tmp_path, remote_url):
    for step in (2, 4, 10):
        local, _ = make_checkpoint(tmp_path / "home", step)
        upload_checkpoint(local, remote_url, RUN, step)
    partial, _ = make_checkpoint(tmp_path / "home", 12)
    fs, path = remote_fs(remote_url, RUN, 12)
    fs.makedirs(path, exist_ok=True)
    fs.put_file(str(partial / "optimizer.pt"), f"{path}/optimizer.pt")  # an upload that never finished
    assert remote_steps(remote_url, RUN) == [2, 4, 10]  # numeric order, not "10" < "2"
    delete_remote(remote_url, RUN, 4)
    assert remote_steps(remote_url, RUN) == [2, 10]
    assert remote_steps(remote_url, "no-such-run") == []
