"""Benchmark — checkpoint upload to S3 vs a local disk copy of the same bytes.

A synthetic checkpoint (random bytes shaped like a LoRA checkpoint with optimizer state: one
large optimizer.pt, a smaller adapter, HF's small files, a manifest from write_manifest) is
copied, each the median of several repeats:

- baseline: `shutil.copytree` to another directory of the same disk, and the same + `os.sync()`;
- `upload_checkpoint` to a local S3 server (moto in server mode on 127.0.0.1, through s3fs):
  stream every file, manifest last, then re-read the whole copy to verify it;
- `verify_remote` alone (the re-read), so upload − verify ≈ the transfer itself;
- `download_checkpoint` (stream, fsync, verify locally, rename into place);
- reference: boto3's `upload_file` of the same files (what the SDK alone gets from this server);
- `upload_checkpoint` to a `file://` remote (fsspec overhead without a network).

Ratio = throughput / local copy throughput (same bytes). moto keeps objects in a Python
process on the same 2 cores, so this is a floor for a real S3 endpoint, not a ceiling.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RUN = "bench"
STEP = 10
BOTO3_ROW = "reference: boto3 upload_file of the same files to S3 (no verify)"


def make_checkpoint(root: Path, total_bytes: int) -> Path:
    """checkpoint-10 of `total_bytes` random bytes (2/3 optimizer, 1/3 adapter, plus small files), with its manifest."""
    from ckptflow.integrity import write_manifest

    d = root / f"checkpoint-{STEP}"
    d.mkdir(parents=True)
    sizes = {
        "optimizer.pt": total_bytes * 2 // 3,
        "adapter_model.safetensors": total_bytes // 3,
        "scheduler.pt": 1_465,
        "rng_state.pth": 14_645,
        "trainer_state.json": 2_000,
        "training_args.bin": 5_905,
        "adapter_config.json": 800,
    }
    for name, size in sizes.items():
        with open(d / name, "wb") as f:
            for start in range(0, size, 2**20):
                f.write(os.urandom(min(2**20, size - start)))
    write_manifest(d, step=STEP, metrics={}, settings_digest="bench")
    return d


def timed(fn, repeat: int, before=None) -> float:
    times = []
    for _ in range(repeat):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    sys.path[:0] = [str(C.TREE / "src"), str(C.TREE)]
    from ckptflow.integrity import manifest_sha256
    from ckptflow.remote import delete_remote, download_checkpoint, upload_checkpoint, verify_remote
    from tests.s3 import s3_server

    report = C.Report("remote", "Checkpoint upload to object storage vs the local disk", args.quick)
    repeat = 1 if args.quick else 3
    total = (16 if args.quick else 256) * 2**20
    with C.Workdir(args, "remote") as work, s3_server() as server:
        os.environ.update(server.env())
        ck = make_checkpoint(work / "src", total)
        size = sum(p.stat().st_size for p in ck.rglob("*") if p.is_file())
        mb = size / 2**20
        s3_url = f"s3://{server.create_bucket('bench')}/team"
        file_url = f"file://{work / 'file-remote'}"
        copy_dest = work / "copy"
        dl_dest = work / "download" / f"checkpoint-{STEP}"
        sha = manifest_sha256(ck)

        def clear(path: Path):
            return lambda: shutil.rmtree(path, ignore_errors=True)

        upload_checkpoint(ck, s3_url, RUN, STEP)  # first-call costs (imports, connections): not measured
        rows = {
            "local copy (copytree)": timed(lambda: shutil.copytree(ck, copy_dest), repeat, clear(copy_dest)),
            "local copy + sync": timed(lambda: (shutil.copytree(ck, copy_dest), os.sync()), repeat, clear(copy_dest)),
            "upload_checkpoint → S3 (send + verify)": timed(
                lambda: upload_checkpoint(ck, s3_url, RUN, STEP), repeat, lambda: delete_remote(s3_url, RUN, STEP)
            ),
            "verify_remote on S3 (re-read only)": timed(lambda: verify_remote(s3_url, RUN, STEP, sha), repeat),
            "download_checkpoint ← S3 (fetch + verify)": timed(
                lambda: download_checkpoint(s3_url, RUN, STEP, dl_dest, sha), repeat, clear(dl_dest.parent)
            ),
            BOTO3_ROW: timed(
                lambda: _boto3_upload(server, ck, s3_url), repeat
            ),
            "upload_checkpoint → file:// (send + verify)": timed(
                lambda: upload_checkpoint(ck, file_url, RUN, STEP), repeat, lambda: delete_remote(file_url, RUN, STEP)
            ),
        }
        assert verify_remote(s3_url, RUN, STEP, sha) == []
    base = rows["local copy (copytree)"]
    upload, verify = rows["upload_checkpoint → S3 (send + verify)"], rows["verify_remote on S3 (re-read only)"]
    table = [[label, s, mb / s, C.ratio(base, s)] for label, s in rows.items()]
    transfer = max(upload - verify, 1e-9)
    table.append(["≈ S3 transfer alone (upload − verify)", transfer, mb / transfer, C.ratio(base, transfer)])
    report.table(
        f"Copying a {mb:.0f} MB checkpoint (median of {repeat}; ratio = throughput / local copy throughput)",
        ["operation", "seconds", "MB/s", "ratio to local copy"],
        table,
    )
    report.note(
        f"- S3 = moto {_moto_version()} in server mode on 127.0.0.1, through s3fs; same machine, same bytes.\n"
        f"- upload to S3 runs at {C.ratio(base, upload)} the local copy's throughput "
        f"({mb / upload:.0f} vs {mb / base:.0f} MB/s: {upload / base:.0f}× slower), verification included; "
        f"{C.ratio(rows['local copy + sync'], upload)} of a durable local copy (copy + sync).\n"
        f"- the transfer alone reaches {C.ratio(rows[BOTO3_ROW], transfer)} "
        "of what boto3 alone gets from the same server."
    )
    report.data.update(mb=mb, repeat=repeat, seconds=rows)
    report.save()


def _boto3_upload(server, ck: Path, s3_url: str) -> None:
    """What the SDK alone achieves against this server: multipart with its default threads and 8 MB parts."""
    from boto3.s3.transfer import TransferConfig

    bucket = s3_url.removeprefix("s3://").split("/")[0]
    client, config = server.client(), TransferConfig(multipart_chunksize=8 * 2**20)
    for p in sorted(ck.iterdir()):
        client.upload_file(str(p), bucket, f"reference/{p.name}", Config=config)


def _moto_version() -> str:
    try:
        from importlib.metadata import version

        return version("moto")
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
