"""Resume anywhere: a run's checkpoints go to a real local S3 server (moto on loopback, s3fs) as
they are committed; the home is deleted; an empty home with the same ledger (kept outside
the home) and the same remote resumes from the newest remote copy that verifies and ends
bit-identical to an uninterrupted run. A flipped byte in the newest remote copy makes the
resume fall back to the one before; `export` works from the remote alone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ckptflow import pipeline
from ckptflow.export import PROVENANCE_NAME
from ckptflow.ledger import AttemptStatus, CheckpointState, Ledger
from ckptflow.chunks import run_chunk
from ckptflow.planning import chunk_plan
from ckptflow.remote import RemoteConfigError, delete_remote_export, remote_steps, verify_remote
from ckptflow.remote_fs import REMOTE_URL_ENV
from ckptflow.remote_uploader import UploadFailedError
from ckptflow.training import InjectedFault
from ckptflow.views import checkpoints_view
from tests.badinput import Case, ckptflow, run_case
from tests.helpers import (
    ADAPTER_FILE,
    adapter_weights,
    committed_steps,
    job_for,
    max_abs_diff,
    settings_for,
    train_without_prefect,
)
from tests.s3 import REMOTE_PREFIX

pytestmark = pytest.mark.slow

RUN = "r"
# 3 epochs of the demo = 6 steps, saved at 2, 4, 6; chunks of 2 steps; the first run fails at step 5,
# after checkpoints 2 and 4 are committed and uploaded.
TRAIN = {"chunk_steps": 2, "epochs": 3}
FAULT_STEP = 5
FINAL_STEP = 6


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """checkpoint-6 of the same run trained in one go, without a remote (the bit-identical target)."""
    home = tmp_path_factory.mktemp("reference") / "home"
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("CKPTFLOW_")}
    try:
        settings = settings_for(home, train=TRAIN)
        train_without_prefect(settings, RUN)
    finally:
        os.environ.update(saved)
    return settings.checkpoints_dir(RUN) / f"checkpoint-{FINAL_STEP}"


def _settings(home: Path, ledger_file: Path, remote_url: str, **extra):
    return settings_for(home, ledger_url=f"sqlite:///{ledger_file}", train=TRAIN, checkpoint={"remote_url": remote_url}, **extra)


def _interrupted_run(tmp_path: Path, remote_url: str):
    """Train until the injected failure at step 5; returns (its settings, the ledger file)."""
    ledger_file = tmp_path / "shared-ledger" / "ledger.db"
    ledger_file.parent.mkdir()
    first = _settings(tmp_path / "machine-1" / "home", ledger_file, remote_url, fault={"at_step": FAULT_STEP, "mode": "raise"})
    with pytest.raises(InjectedFault):
        train_without_prefect(first, RUN)
    return first, ledger_file


def _view(settings) -> dict[int, dict]:
    with Ledger(settings.ledger, home=settings.home) as ledger:
        return {row["step"]: row for row in checkpoints_view(ledger, RUN, include_all=True)}


def _attempts(settings) -> list:
    with Ledger(settings.ledger, home=settings.home) as ledger:
        return ledger.attempts(ledger.get_run(RUN).id)


def test_an_empty_home_resumes_from_the_remote_bit_identical_and_exports_from_it(reference, s3, s3_remote, tmp_path):
    url, bucket = s3_remote
    # 1. Checkpoints 2 and 4 are committed, uploaded, verified and marked before the failure at step 5.
    first, ledger_file = _interrupted_run(tmp_path, url)
    assert committed_steps(first, RUN) == [2, 4]
    assert remote_steps(url, RUN) == [2, 4]
    assert {s: r["location"] for s, r in _view(first).items()} == {2: "both", 4: "both"}

    # 2. The machine is gone: nothing of its home is left.
    shutil.rmtree(first.home)
    second = _settings(tmp_path / "machine-2" / "home", ledger_file, url)
    env = {"CKPTFLOW_HOME": str(second.home), "CKPTFLOW_LEDGER_URL": second.ledger, **s3.env()}
    listed = ckptflow("checkpoints", RUN, "--json", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert {row["step"]: row["location"] for row in json.loads(listed.stdout)} == {2: "remote", 4: "remote"}
    verified = ckptflow("verify", RUN, "--json", cwd=tmp_path, env={**env, "CKPTFLOW_CHECKPOINT__REMOTE_URL": url})
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # 3. An empty home resumes from the newest remote copy (checkpoint-4) and trains to the end.
    before = len(_attempts(second))
    train_without_prefect(second, RUN)
    attempts = _attempts(second)[before:]
    assert [a.resumed_from_step for a in attempts] == [4, 4], attempts  # chunk 0: downloaded, nothing to train; chunk 2
    assert "downloaded its remote copy" in attempts[0].notes, attempts[0].notes
    final = second.checkpoints_dir(RUN) / f"checkpoint-{FINAL_STEP}"
    assert max_abs_diff(adapter_weights(reference), adapter_weights(final)) == 0.0

    # 4. Every checkpoint retention keeps is on the remote, and only those (pruned copies deleted).
    view = _view(second)
    kept = {s for s, r in view.items() if r["state"] == CheckpointState.COMMITTED}
    assert FINAL_STEP in kept
    assert set(remote_steps(url, RUN)) == kept
    assert all(view[s]["location"] in ("both", "remote") for s in kept)
    assert all(view[s]["location"] is None for s in view.keys() - kept)

    # 5. A third empty home exports from the remote alone.
    shutil.rmtree(second.home)
    third = _settings(tmp_path / "machine-3" / "home", ledger_file, url)
    exported = pipeline.export_run(third, RUN)
    assert exported["step"] in kept
    assert any(Path(exported["path"]).glob("*.safetensors"))
    assert (third.checkpoints_dir(RUN) / f"checkpoint-{exported['step']}" / ADAPTER_FILE).is_file()

    # 6. The export went up too, its provenance (the remote commit marker) byte-equal to the local one.
    local = Path(exported["path"])
    prefix = f"{REMOTE_PREFIX}/exports/{RUN}/"
    keys = {k.removeprefix(prefix) for k in s3.keys(bucket, prefix)}
    assert keys == {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    provenance = s3.client().get_object(Bucket=bucket, Key=prefix + PROVENANCE_NAME)["Body"].read()
    assert provenance == (local / PROVENANCE_NAME).read_bytes()

    # 7. Export retention's remote half: the run's remote export goes, provenance first, nothing else touched.
    assert delete_remote_export(url, RUN, PROVENANCE_NAME) == len(keys)
    assert s3.keys(bucket, prefix) == [] and set(remote_steps(url, RUN)) == kept


def test_a_flipped_byte_in_the_newest_remote_copy_falls_back_to_the_one_before(reference, s3, s3_remote, tmp_path):
    url, bucket = s3_remote
    first, ledger_file = _interrupted_run(tmp_path, url)
    assert remote_steps(url, RUN) == [2, 4]

    # 1. One byte of checkpoint-4's adapter weights changes on the server; the home is gone.
    key = f"{REMOTE_PREFIX}/runs/{RUN}/checkpoints/checkpoint-4/{ADAPTER_FILE}"
    client = s3.client()
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    assert verify_remote(url, RUN, 4) != []
    shutil.rmtree(first.home)

    # 2. The resume never uses it: it starts from checkpoint-2 (saying why) and still ends bit-identical.
    second = _settings(tmp_path / "machine-2" / "home", ledger_file, url)
    before = len(_attempts(second))
    train_without_prefect(second, RUN)
    resumed = _attempts(second)[before]
    assert resumed.resumed_from_step == 2
    assert "checkpoint-4" in resumed.notes and "remote copy" in resumed.notes, resumed.notes
    final = second.checkpoints_dir(RUN) / f"checkpoint-{FINAL_STEP}"
    assert max_abs_diff(adapter_weights(reference), adapter_weights(final)) == 0.0

    # 3. Checkpoint-4 was trained again; if it is kept, its remote copy was replaced and verifies.
    if 4 in committed_steps(second, RUN):
        assert verify_remote(url, RUN, 4) == []


def test_a_failed_upload_fails_the_chunk_keeps_the_local_commit_and_the_retry_uploads_it(s3, s3_remote, tmp_path):
    # One chunk of 4 steps; the bucket vanishes after the run opened, so its uploads (checkpoints 2 and 4) fail.
    url, bucket = s3_remote
    settings = settings_for(tmp_path / "home", train={"chunk_steps": 4}, checkpoint={"remote_url": url})
    opened = pipeline.open_or_create_run(settings, pipeline.prepare(settings), RUN, False)
    s3.client().delete_bucket(Bucket=bucket)
    (chunk,) = chunk_plan(opened.run.total_steps, 4, settings.checkpoint.save_steps)
    with pytest.raises(UploadFailedError, match="create it, or change CKPTFLOW_CHECKPOINT__REMOTE_URL"):
        run_chunk(job_for(settings, RUN, chunk))
    assert committed_steps(settings, RUN) == [2, 4]
    assert {s: r["location"] for s, r in _view(settings).items()} == {2: "local", 4: "local"}
    failed = _attempts(settings)[-1]
    assert failed.status == AttemptStatus.FAILED and "upload" in failed.error

    # The retry has nothing left to train, but uploads what is missing before the chunk succeeds.
    s3.client().create_bucket(Bucket=bucket)
    train_without_prefect(settings, RUN)
    kept = committed_steps(settings, RUN)
    assert remote_steps(url, RUN) == kept and 4 in kept
    assert {_view(settings)[s]["location"] for s in kept} == {"both"}


BAD_REMOTES = [
    Case("remote-not-a-url", ("run", "--run-name", "r"), (REMOTE_URL_ENV, "s3://bucket/prefix"), env={REMOTE_URL_ENV: "bucket/prefix"}),
    Case("remote-no-bucket", ("run", "--run-name", "r"), (REMOTE_URL_ENV,), env={REMOTE_URL_ENV: "s3://"}),
    Case("remote-bad-scheme", ("plan",), (REMOTE_URL_ENV,), env={REMOTE_URL_ENV: "3s://bucket/p"}),
]


@pytest.mark.parametrize("case", BAD_REMOTES, ids=lambda c: c.id)
def test_a_remote_url_that_is_not_one_is_refused_before_anything_runs(case, home, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run_case(case, home=home, cwd=cwd)


def test_a_missing_bucket_is_refused_before_the_run_opens(s3, s3_remote, home):
    url, bucket = s3_remote
    settings = settings_for(home, checkpoint={"remote_url": url.replace(bucket, bucket + "-typo")})
    prepared = pipeline.prepare(settings)
    with pytest.raises(RemoteConfigError, match=f"{bucket}-typo.*create it, or change {REMOTE_URL_ENV}"):
        pipeline.open_or_create_run(settings, prepared, RUN, False)
    with Ledger(settings.ledger, home=settings.home) as ledger:
        assert ledger.get_run(RUN) is None


def test_ckptflow_run_uploads_every_kept_checkpoint_before_it_reports_completed(s3, s3_remote, home, tmp_path):
    # The real CLI and flow (temporary Prefect server), chunks of 2 steps, the remote from the environment.
    url, bucket = s3_remote
    env = {"CKPTFLOW_HOME": str(home), REMOTE_URL_ENV: url, "CKPTFLOW_TRAIN__CHUNK_STEPS": "2", **s3.env()}
    done = ckptflow("run", "--run-name", RUN, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    listed = ckptflow("checkpoints", RUN, "--json", cwd=tmp_path, env=env)
    rows = json.loads(listed.stdout)
    assert rows and {row["location"] for row in rows} == {"both"}
    assert remote_steps(url, RUN) == [row["step"] for row in rows]
    assert f"{REMOTE_PREFIX}/exports/{RUN}/{PROVENANCE_NAME}" in s3.keys(bucket, f"{REMOTE_PREFIX}/exports/")


@pytest.mark.parametrize("remote_url", ["", "s3://other-bucket/prefix", "file:///srv/ckpt"])
def test_the_remote_is_not_part_of_the_run_fingerprint(remote_url, home):
    # The same run resumes whichever bucket (or none) a machine uploads to.
    plain = settings_for(home)
    assert settings_for(home, checkpoint={"remote_url": remote_url}).training_fingerprint() == plain.training_fingerprint()
