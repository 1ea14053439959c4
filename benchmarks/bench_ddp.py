"""Benchmark 7 — CPU DDP: 2 torchrun ranks (gloo) vs one process, at the same global batch.

Both variants train the benchmark workload (bench-gpt2, LoRA, demo-large) for the same
number of optimizer steps with the same global batch (8 sequences per step), each in child
processes started by ckptflow's own launchers, through the library path (no Prefect):

- single: launcher=subprocess, batch_size=8, one process with OMP_NUM_THREADS=1;
- ddp:    launcher=torchrun, nproc_per_node=2, batch_size=4, OMP_NUM_THREADS=1 per rank.

One thread per process: on a small shared machine, two OpenMP threads in one process
contend with everything else running (measured: 20x slower than one thread under load).

Steady-state steps/s is measured between the first and the last committed checkpoint (as
the parent sees the commit lines), so process start and model load are not in it; wall is
the whole chunk, start included. DDP uses two cores where the single process uses one; the
table shows what that buys after gloo's all-reduce and the second process's start.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # tests.helpers: settings and adapter weights, as the DDP tests use
import _common as C  # noqa: E402

GLOBAL_BATCH = 8
NPROC = 2
# The commit line rank 0 logs (chunks.py), as the launcher streams it into the parent's log.
_COMMITTED = re.compile(r"committed checkpoint-(\d+)")


class _CommitTimes(logging.Handler):
    """When the parent saw each `committed checkpoint-N` line of its child."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = _COMMITTED.search(record.getMessage())
        if m:
            self.seen.append((int(m[1]), time.monotonic()))


def _train(home: Path, model: Path, data: Path, *, launcher: str, steps: int, save: int, threads: int) -> dict:
    from ckptflow import pipeline
    from ckptflow.chunks import ChunkJob, run_chunk
    from ckptflow.launchers import launcher as launch_by_name
    from ckptflow.planning import Chunk

    from tests.helpers import adapter_weights, settings_for

    nproc = NPROC if launcher == "torchrun" else 1
    settings = settings_for(
        home,
        model={"name_or_path": str(model)},
        data={"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")},
        train={"max_steps": steps, "batch_size": GLOBAL_BATCH // nproc, "launcher": launcher, "nproc_per_node": nproc},
        checkpoint={"save_steps": save, "eval_steps": save, "save_total_limit": 2, "retention": "recent"},
    )
    run = f"{launcher}-{nproc}"
    pipeline.open_or_create_run(settings, pipeline.prepare(settings), run, False)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the chunk's processes
    commits = _CommitTimes()
    logging.getLogger("ckptflow.launchers").addHandler(commits)
    t0 = time.monotonic()
    try:
        run_chunk(ChunkJob.for_chunk(settings, run, Chunk(0, 0, steps)), launch_by_name(launcher))
    finally:
        logging.getLogger("ckptflow.launchers").removeHandler(commits)
    wall = time.monotonic() - t0
    (first, t_first), (last, t_last) = commits.seen[0], commits.seen[-1]
    rate = (last - first) / (t_last - t_first) if last > first else float("nan")
    final = adapter_weights(settings.checkpoints_dir(run) / f"checkpoint-{steps}")
    return {"wall_s": wall, "steps_per_s": rate, "commits": commits.seen, "final": final}


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    steps, save = (4, 2) if args.quick else (60, 20)
    report = C.Report("ddp", "7. CPU DDP (torchrun, 2 ranks, gloo) vs one process, same global batch", args.quick)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    for key, value in C.QUIET_ENV.items():
        os.environ.setdefault(key, value)
    with C.Workdir(args, "ddp") as work:
        home, model, data = C.prepare_workload(work)
        os.environ["CKPTFLOW_HOME"] = str(home)
        results = {}
        for label, launcher, threads in (("single process", "subprocess", 1), (f"DDP {NPROC} ranks", "torchrun", 1)):
            print(f"[ddp] {label} ...", flush=True)
            results[label] = _train(home, model, data, launcher=launcher, steps=steps, save=save, threads=threads)
    base = results["single process"]
    rows = []
    for label, r in results.items():
        rows.append(
            [label, f"{r['steps_per_s']:.2f}", f"{r['steps_per_s'] / base['steps_per_s']:.2f}", f"{r['wall_s']:.1f}",
             f"{r['wall_s'] / base['wall_s']:.2f}"]
        )  # fmt: skip
    report.table(
        f"Same global batch ({GLOBAL_BATCH}), {steps} steps, save every {save}; ratio = DDP / single process",
        ["variant", "steps/s (steady)", "ratio", "wall s (incl. start)", "ratio"],
        rows,
    )
    ddp = results[f"DDP {NPROC} ranks"]
    from tests.helpers import max_abs_diff

    diff = max_abs_diff(ddp["final"], base["final"])
    report.note(
        f"final adapter, DDP vs single process: max |Δ| = {diff:.3g} (same data and global batch; the gradient "
        f"is summed in another order, so bit-equality is not expected across world sizes — only within one)"
    )
    report.data.update(
        steps=steps, save_steps=save, global_batch=GLOBAL_BATCH, max_abs_diff=diff, cpus=os.cpu_count(),
        results={k: {kk: v for kk, v in r.items() if kk != "final"} for k, r in results.items()},
    )  # fmt: skip
    report.save()


if __name__ == "__main__":
    main()
