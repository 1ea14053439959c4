"""Prefect-free driver of the finetune pipeline (the library path), for crash drills.

    python tests/crash_driver.py RUN_NAME [run|export]

`run`: prepare → open the run → hold its lease → run_chunk for every chunk → evaluate →
export → completed; what flows/finetune.py does, minus Prefect (no retries: a failed chunk
ends the process). `export`: export the run's best checkpoint again (`ckptflow export`).
Settings come from the environment (CKPTFLOW_*). Exit 0 done, 1 failed, 2 bad input.

Drills that start dozens of training processes fork them from a multiprocessing forkserver
that imported torch/transformers/TRL once (`PRELOAD`, `run_forked`): each is still a real
process that is SIGKILLed for real, but starts in milliseconds instead of ~5 s of imports.
"""

from __future__ import annotations

import logging
import os
import sys

for _key, _value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)


# Modules a forkserver imports once for all drill processes (see run_forked): what every
# training process imports anyway.
PRELOAD = [
    "torch",
    "transformers.trainer",
    "trl.trainer.sft_trainer",
    "peft",
    "datasets",
    "ckptflow.chunks",
    "ckptflow.data",
    "ckptflow.evaluation",
    "ckptflow.export",
    "ckptflow.modeling",
    "ckptflow.pipeline",
    "tests.crash_driver",
]


def run_forked(run_name: str, env: dict[str, str], cwd: str, log_path: str, command: str = "run") -> None:
    """multiprocessing target: become `python tests/crash_driver.py RUN_NAME COMMAND` with exactly `env`'s CKPTFLOW_* settings."""
    for key in [k for k in os.environ if k.startswith("CKPTFLOW_")]:
        del os.environ[key]
    os.environ.update(env)
    os.chdir(cwd)
    import torch

    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in every other drill process: the same numerics
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    code = main(run_name, command)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(run_name: str, command: str = "run") -> int:
    from ckptflow import pipeline
    from ckptflow.chunks import ChunkJob, lease_holder_id, run_chunk
    from ckptflow.errors import BadInputError
    from ckptflow.ledger import RunStatus
    from ckptflow.planning import chunk_plan
    from ckptflow.quiet import quiet_libraries
    from ckptflow.settings import load_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    quiet_libraries()
    settings = load_settings()
    settings = settings.model_copy(update={"home": settings.home.resolve()})
    holder = lease_holder_id()
    try:
        if command == "export":
            exported = pipeline.export_run(settings, run_name)
            print(f"exported step {exported['step']} to {exported['path']}", file=sys.stderr)
            return 0
        opened = pipeline.open_or_create_run(settings, pipeline.prepare(settings), run_name, False)
        if opened.completed:
            print(f"run {run_name} already completed", file=sys.stderr)
            return 0
        with pipeline.run_lease(settings, run_name, holder):
            try:
                plan = chunk_plan(opened.run.total_steps, settings.train.chunk_steps, settings.checkpoint.save_steps)
                for chunk in plan:
                    job = ChunkJob.for_chunk(settings, run_name, chunk, lease_holder=holder)
                    run_chunk(job)
                pipeline.evaluate_run(settings, run_name)
                exported = pipeline.export_run(settings, run_name)
                pipeline.set_status(settings, run_name, RunStatus.COMPLETED)
            except BaseException:
                pipeline.set_status(settings, run_name, RunStatus.FAILED)
                raise
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"run {run_name} completed: exported step {exported['step']} to {exported['path']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:3]))
