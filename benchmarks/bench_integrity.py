"""Benchmark 3 — integrity cost vs the disk: manifest hashing and verify against plain reads and the write.

A full-state checkpoint of a few hundred MB (a GPT-2 of 6 layers × 576, vocab 32k: weights as
safetensors + AdamW moments as optimizer.pt + HF's small files) is written the way HF's
Trainer writes it. Then, each the median of several repeats:

- write: the save itself (buffered, as HF does), and write + sync (durable);
- commit: `write_manifest` right after the save (hash from page cache + fsync = pays the writeback);
- cold: with `--drop-caches` (what `make bench` passes; needs root), the machine's page cache
  is dropped (`echo 3 > /proc/sys/vm/drop_caches`) before each of sequential read /
  `verify_checkpoint` / `write_manifest` of the same files; without it (tests, --quick runs)
  nothing is dropped and cold = warm;
- warm: the same from page cache; and sha256 of a memory buffer (the CPU ceiling);
- reference: plain hashlib with the files on a 2-thread pool (hashlib releases the GIL).

Target (issue 6): hashing throughput >= 0.7 x sequential read throughput.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
BLOCK = 8 * 2**20  # read size, the same as ckptflow.integrity.HASH_BLOCK_SIZE


def drop_caches(enabled: bool) -> bool:
    """Write dirty pages, then drop the whole machine's page cache; False if not `enabled` or not
    permitted. Opt-in (`--drop-caches`) because it slows down everything else running on the machine."""
    if not enabled:
        return False
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
        return True
    except OSError:
        return False


def build_state(quick: bool):
    """(model, optimizer-like state dict): what a full fine-tune checkpoint holds."""
    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    cfg = dict(n_layer=1, n_embd=64, n_head=2, vocab_size=1000) if quick else dict(n_layer=6, n_embd=576, n_head=8, vocab_size=32000)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_positions=1024, bos_token_id=0, eos_token_id=0, **cfg))
    state = {
        "state": {i: {"step": torch.tensor(10.0), "exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
                  for i, p in enumerate(model.parameters())},
        "param_groups": [{"lr": 2e-4, "params": list(range(len(list(model.parameters()))))}],
    }  # fmt: skip
    return model, state


def write_checkpoint(path: Path, model, optim_state) -> None:
    """The files HF's Trainer._save_checkpoint writes for a full fine-tune (no LoRA)."""
    import torch

    path.mkdir(parents=True)
    model.save_pretrained(path)  # config.json, generation_config.json, model.safetensors
    torch.save(optim_state, path / "optimizer.pt")
    torch.save({"last_epoch": 10}, path / "scheduler.pt")
    torch.save({"python": 0, "numpy": 0, "cpu": torch.get_rng_state()}, path / "rng_state.pth")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": []}))


def files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def sequential_read(path: Path) -> int:
    """Read every file once with the same block size as the hasher; returns bytes read."""
    buf = bytearray(BLOCK)
    total = 0
    for f in files_of(path):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total


def _hash_file(f: Path) -> str:
    h, buf = hashlib.sha256(), bytearray(BLOCK)
    view = memoryview(buf)
    with open(f, "rb", buffering=0) as fh:
        while n := fh.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def parallel_hash(path: Path, workers: int = 2) -> dict[str, str]:
    """Reference: hash the files on a small thread pool, largest first (sha256 releases the GIL)."""
    files = sorted(files_of(path), key=lambda f: f.stat().st_size, reverse=True)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return dict(zip((str(f) for f in files), pool.map(_hash_file, files)))


def measure(fn, repeat: int, *, cold: bool, drop: bool) -> float:
    times = []
    for _ in range(repeat):
        if cold:
            drop_caches(drop)
        else:
            fn()  # warm the page cache
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--drop-caches", action="store_true", help="drop the machine's page cache before cold reads (root)")
    args = p.parse_args()
    sys.path[:0] = [str(C.TREE / "src")]
    from ckptflow.integrity import verify_checkpoint, write_manifest

    report = C.Report("integrity", "3. Integrity cost vs the disk", args.quick)
    repeat = 1 if args.quick else 5
    with C.Workdir(args, "integrity") as work:
        model, optim_state = build_state(args.quick)
        can_drop = drop_caches(args.drop_caches)
        write_checkpoint(work / "warmup" / "checkpoint-10", model, optim_state)  # first-call costs, not measured
        shutil.rmtree(work / "warmup")
        # 1. write as HF does, then commit (manifest right after: hash from cache + fsync)
        write_t, commit_t, sync_t = [], [], []
        for i in range(repeat):
            ck = work / f"w{i}" / "checkpoint-10"
            drop_caches(args.drop_caches)
            t0 = time.perf_counter()
            write_checkpoint(ck, model, optim_state)
            t1 = time.perf_counter()
            write_manifest(ck, step=10, metrics={}, settings_digest="bench")
            t2 = time.perf_counter()
            write_t.append(t1 - t0)
            commit_t.append(t2 - t1)
            ck2 = work / f"s{i}" / "checkpoint-10"
            drop_caches(args.drop_caches)
            t0 = time.perf_counter()
            write_checkpoint(ck2, model, optim_state)
            os.sync()
            sync_t.append(time.perf_counter() - t0)
            shutil.rmtree(ck2.parent)
            if i < repeat - 1:
                shutil.rmtree(ck.parent)
        ck = work / f"w{repeat - 1}" / "checkpoint-10"
        size = sum(f.stat().st_size for f in files_of(ck))
        nfiles = len(files_of(ck))
        mb = size / 2**20
        # 2. reads and hashing, cold and warm
        results: dict[str, dict] = {}
        for label, fn in [
            ("sequential read", lambda: sequential_read(ck)),
            ("verify_checkpoint", lambda: verify_checkpoint(ck)),
            ("write_manifest (re-hash + fsync)", lambda: write_manifest(ck, step=10, metrics={}, settings_digest="bench")),
            ("reference: plain hashlib, files on 2 threads", lambda: parallel_hash(ck)),
        ]:
            results[label] = {
                "cold": measure(fn, repeat, cold=True, drop=args.drop_caches),
                "warm": measure(fn, repeat, cold=False, drop=args.drop_caches),
            }
        buf = os.urandom(min(size, 256 * 2**20))
        t0 = time.perf_counter()
        hashlib.sha256(buf).digest()
        sha_mbps = len(buf) / 2**20 / (time.perf_counter() - t0)
        problems = verify_checkpoint(ck)
    assert not problems, problems
    read = results["sequential read"]
    rows = []
    for label, r in results.items():
        rows.append([label, r["cold"], mb / r["cold"], C.ratio(read["cold"], r["cold"]), r["warm"], mb / r["warm"],
                     C.ratio(read["warm"], r["warm"])])  # fmt: skip
    report.table(
        f"Reading and hashing a {mb:.0f} MB checkpoint ({nfiles} files; median of {repeat}; "
        f"ratio = throughput / sequential read throughput)",
        ["operation", "cold s", "cold MB/s", "cold ratio", "warm s", "warm MB/s", "warm ratio"],
        rows,
    )
    w, c, s = statistics.median(write_t), statistics.median(commit_t), statistics.median(sync_t)
    report.table(
        "The save and its commit (seconds; ratio against the save)",
        ["operation", "seconds", "MB/s", "ratio to save"],
        [
            ["save as HF does (buffered, no fsync)", w, mb / w, "1.00×"],
            ["save + sync (durable)", s, mb / s, C.ratio(s, w)],
            ["commit: write_manifest right after the save (hash + fsync)", c, mb / c, C.ratio(c, w)],
            ["save + commit", w + c, mb / (w + c), C.ratio(w + c, w)],
        ],
    )
    verdict = mb / results["verify_checkpoint"]["cold"] / (mb / read["cold"])
    report.note(
        f"- sha256 of a memory buffer (CPU ceiling, one core): {sha_mbps:,.0f} MB/s.\n"
        f"- page cache {'dropped before each cold measurement' if can_drop else 'NOT dropped (no --drop-caches, or no permission): cold = warm'}.\n"
        f"- verify vs sequential read, cold: {verdict:.2f}× (target ≥ 0.70×)."
    )
    report.data.update(
        mb=mb, repeat=repeat, dropped_caches=can_drop, sha256_mem_mbps=sha_mbps, write_s=write_t,
        commit_s=commit_t, write_sync_s=sync_t, reads=results, verify_to_read_cold=verdict,
    )  # fmt: skip
    report.save()


if __name__ == "__main__":
    main()
