"""Child-process entry point of the subprocess/torchrun launchers: train one attempt, exit 0 on success."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ckptflow.chunks import AttemptPlan, ChunkJob, train_attempt
from ckptflow.quiet import quiet_libraries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ckptflow.worker")
    parser.add_argument("--job", type=Path, required=True)
    parser.add_argument("--plan", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{os.environ.get('RANK', '0')} %(name)s: %(message)s")
    quiet_libraries()
    train_attempt(ChunkJob.from_json(args.job.read_text()), AttemptPlan.from_json(args.plan.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
