"""GPU check: DDP through torchrun on every visible GPU, a rank killed mid-run, resumed, compared.

    make gpu-check                      # on a CUDA machine (exits 0 with a message elsewhere)
    python benchmarks/gpu_check.py --cpu   # the same check with 2 CPU ranks (gloo), small sizes

It trains the built-in bench model (builtin:bench-gpt2 on builtin:demo-large: nothing is
downloaded) through ckptflow's library path with launcher=torchrun and nproc_per_node = the
number of visible GPUs (one GPU: torchrun with one rank), in bf16 where the GPU supports it
(as TRL would choose), fp32 on CPU:

1. an uninterrupted run (the reference): steps/s and the save stall;
2. the same run in a fresh home, whose last rank is SIGKILLed once a mid-run checkpoint is
   committed (watched in the ledger); torchrun tears the chunk down;
3. the retry (as Prefect would run it): resume latency = launch → first resumed step seen;
4. the final adapter of the resumed run against the reference: bit-exact, or max |Δ|.

Prints one table; exits 1 if the check itself failed (not for a non-zero |Δ|, which is
reported: cuBLAS/nccl may reorder sums; CUBLAS_WORKSPACE_CONFIG is set for determinism).
Sized to finish in well under 5 minutes.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

MODEL = "builtin:bench-gpt2"
DATA = "builtin:demo-large"
RUN = "gpu-check"
# Environment of every training process: offline, quiet, deterministic cuBLAS.
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}
# Rank 0's per-step log line (ckptflow.logline) and commit line (chunks.py), as the launcher relays them.
_STEP_LINE = re.compile(r"rank0 \S+: step (\d+)/\d+")
_COMMIT_LINE = re.compile(r"committed checkpoint-(\d+)")


@dataclass(frozen=True)
class Sizes:
    steps: int
    save_steps: int
    batch_size: int
    kill_after: int  # kill once this checkpoint is committed


GPU_SIZES = Sizes(steps=200, save_steps=50, batch_size=8, kill_after=100)
CPU_SIZES = Sizes(steps=12, save_steps=4, batch_size=2, kill_after=4)


class _Lines(logging.Handler):
    """Every relayed line of the training processes, with the moment the parent saw it."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[float, str]] = []
        self._guard = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            self.lines.append((time.monotonic(), record.getMessage()))

    def steps(self, since: float = 0.0) -> list[tuple[int, float]]:
        with self._guard:
            found = [(int(m[1]), t) for t, line in self.lines if t >= since and (m := _STEP_LINE.search(line))]
        return found


def _settings(home: Path, sizes: Sizes, nproc: int, bf16: bool):
    from tests.helpers import settings_for

    return settings_for(
        home,
        model={"name_or_path": MODEL},
        data={"train": DATA},
        train={
            "max_steps": sizes.steps, "chunk_steps": sizes.steps, "batch_size": sizes.batch_size, "logging_steps": 1,
            "launcher": "torchrun", "nproc_per_node": nproc, "bf16": bf16, "retry_delay_seconds": 0,
        },
        # no evaluation: the gap after a save step is the save alone
        checkpoint={"save_steps": sizes.save_steps, "eval_strategy": "no", "retention": "recent", "save_total_limit": 2},
    )  # fmt: skip


def _open(settings) -> None:
    from ckptflow import pipeline

    pipeline.open_or_create_run(settings, pipeline.prepare(settings), RUN, False)


def _job(settings):
    from ckptflow.chunks import ChunkJob
    from ckptflow.planning import Chunk

    return ChunkJob.for_chunk(settings, RUN, Chunk(0, 0, settings.train.max_steps))


def _rate_and_stall(steps: list[tuple[int, float]], save_steps: int) -> tuple[float, float]:
    """(steady steps/s without the save gaps, median extra seconds of a step right after a save)."""
    gaps = {b: tb - ta for (a, ta), (b, tb) in zip(steps, steps[1:]) if b == a + 1}
    after_save = [g for s, g in gaps.items() if (s - 1) % save_steps == 0]
    plain = [g for s, g in gaps.items() if (s - 1) % save_steps != 0]
    if not plain:
        return float("nan"), float("nan")
    step_s = statistics.median(plain)
    stall = statistics.median(after_save) - step_s if after_save else float("nan")
    return 1 / step_s, max(stall, 0.0)


def _ranks_of_this_process() -> dict[int, int]:
    """RANK -> pid of the torchrun workers under this process."""
    import psutil

    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if "ckptflow.worker" in proc.cmdline() and "RANK" in (env := proc.environ()):
                out[int(env["RANK"])] = proc.pid
        except psutil.Error:
            continue
    return out


def _committed(settings) -> set[int]:
    from ckptflow.ledger import CheckpointState, Ledger

    with Ledger(settings.ledger, home=settings.home) as ledger:
        run = ledger.get_run(RUN)
        return {c.step for c in ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED])}


def _final(settings) -> dict:
    from tests.helpers import adapter_weights

    return adapter_weights(settings.checkpoints_dir(RUN) / f"checkpoint-{settings.train.max_steps}")


def check(work: Path, sizes: Sizes, nproc: int, bf16: bool, lines: _Lines) -> list[list[str]]:
    from ckptflow.chunks import run_chunk
    from ckptflow.launchers import ChunkProcessError, launcher

    from tests.helpers import max_abs_diff

    torchrun = launcher("torchrun")
    # 1. the uninterrupted reference
    ref = _settings(work / "reference", sizes, nproc, bf16)
    _open(ref)
    t0 = time.monotonic()
    run_chunk(_job(ref), torchrun)
    ref_wall = time.monotonic() - t0
    rate, stall = _rate_and_stall(lines.steps(since=t0), sizes.save_steps)
    # 2. the same run, its last rank SIGKILLed once checkpoint-<kill_after> is committed
    killed = _settings(work / "killed", sizes, nproc, bf16)
    _open(killed)
    victim = nproc - 1
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_chunk, _job(killed), torchrun)
        deadline = time.monotonic() + 240
        while sizes.kill_after not in _committed(killed):
            if running.done() or time.monotonic() > deadline:
                raise SystemExit(f"gpu-check: checkpoint-{sizes.kill_after} never committed ({running.exception()!r})")
            time.sleep(0.05)
        pid = _ranks_of_this_process()[victim]
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        try:
            running.result(timeout=120)
            raise SystemExit("gpu-check: the chunk survived the kill of a rank")
        except ChunkProcessError:
            teardown = time.monotonic() - t_kill
    # 3. the retry, as Prefect runs it: resume latency = launch → first resumed step seen by the parent
    t_resume = time.monotonic()
    run_chunk(_job(killed), torchrun)
    resumed = [t for step, t in lines.steps(since=t_resume)]
    latency = resumed[0] - t_resume if resumed else float("nan")
    diff = max_abs_diff(_final(killed), _final(ref))
    equal = "bit-exact" if diff == 0.0 else f"max |Δ| {diff:.3g}"
    return [
        ["uninterrupted", f"{rate:.2f}", f"{stall * 1000:.0f}", "", "", f"{ref_wall:.1f}", "reference"],
        [f"rank {victim} killed after checkpoint-{sizes.kill_after}, resumed", "", "", f"{teardown:.1f}",
         f"{latency:.1f}", f"{time.monotonic() - t_resume:.1f}", equal],
    ]  # fmt: skip


def _table(rows: list[list[str]]) -> str:
    headers = ["run", "steps/s", "save stall ms", "teardown s", "resume latency s", "wall s", "final weights"]
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="no GPU needed: 2 CPU ranks (gloo), small sizes")
    parser.add_argument("--keep", type=Path, default=None, help="keep the homes in this directory")
    args = parser.parse_args(argv)
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    # the training processes import this tree's ckptflow, as this script does
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible (torch.cuda.is_available() is False): nothing to check here.\n"
              "Run it on a machine with GPUs, or `python benchmarks/gpu_check.py --cpu` for the 2-rank CPU version.")  # fmt: skip
        return 0
    if args.cpu:
        nproc, sizes, bf16, where = 2, CPU_SIZES, False, "2 CPU ranks (gloo), fp32"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    else:
        nproc, sizes = torch.cuda.device_count(), GPU_SIZES
        bf16 = torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(0)
        where = f"{nproc} × {name} (nccl), {'bf16' if bf16 else 'fp32'}"
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    lines = _Lines()
    relay = logging.getLogger("ckptflow.launchers")
    relay.setLevel(logging.INFO)
    relay.addHandler(lines)
    relay.propagate = False  # the children's lines are measured, not printed
    work = args.keep or Path(tempfile.mkdtemp(prefix="ckptflow-gpu-check-"))
    os.environ["CKPTFLOW_HOME"] = str(work / "reference")
    print(f"gpu-check: {MODEL} on {DATA}, launcher=torchrun, {where}; {sizes.steps} steps, save every "
          f"{sizes.save_steps}; work dir {work}", flush=True)  # fmt: skip
    t0 = time.monotonic()
    try:
        rows = check(work, sizes, nproc, bf16, lines)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n" + _table(rows))
    print(f"\ngpu-check done in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
