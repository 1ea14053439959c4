"""Child-process entry point of the subprocess/torchrun launchers: train one attempt, exit 0 on success.

Failures the parent must not retry blindly end with a distinct exit code and, as the last
line of output, `ckptflow-error: {"type": ..., "message": ...}` (see launchers.py).

With `--serve` (launcher=subprocess, see run_child.py) the worker trains one attempt per line
of its stdin (`{"job": ..., "plan": ..., "seq": n}`), printing `ckptflow-chunk-done: n` after
each success, until stdin closes; the first failure ends the process as above, so the next
attempt gets a fresh one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TextIO

from ckptflow.chunks import AttemptPlan, ChunkJob, train_attempt
from ckptflow.errors import BadInputError, InsufficientDiskError
from ckptflow.quiet import quiet_libraries
from ckptflow.secrets import install_redaction

# Exit codes the parent maps back to exceptions (anything else non-zero is a retryable crash).
EXIT_BAD_INPUT = 2
EXIT_DISK_FULL = 3
# Prefix of the last output line that carries the error for the parent.
ERROR_LINE_PREFIX = "ckptflow-error: "
# Env var with the launching process's pid: the worker dies with it.
PARENT_PID_ENV = "CKPTFLOW_LAUNCHER_PID"
# First argument that makes this module exec torchrun's agent instead of training (see exec_torchrun).
TORCHRUN_AGENT_ARG = "torchrun-agent"
# Argument that makes the worker train the attempts sent on its stdin (see serve).
SERVE_ARG = "--serve"
# Prefix of the line that says an attempt sent to a serving worker succeeded (followed by its seq).
CHUNK_DONE_PREFIX = "ckptflow-chunk-done: "
# Linux prctl option: deliver a signal to this process when its parent dies.
_PR_SET_PDEATHSIG = 1


def _report(exc: BaseException) -> None:
    print(ERROR_LINE_PREFIX + json.dumps({"type": type(exc).__name__, "message": str(exc)}), flush=True)


def _die_with_parent() -> bool:
    """Ask Linux to SIGKILL us when our parent dies; False if the launcher is already gone.

    Without this, a child orphaned by `kill -9` of `ckptflow run` would keep training and
    committing checkpoints while a new `ckptflow run` takes the run over: two writers. Under
    torchrun our parent is the torchrun agent, so only subprocess workers check the pid.
    """
    launcher = os.environ.get(PARENT_PID_ENV)
    if not sys.platform.startswith("linux"):
        return True
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return True
    return launcher is None or "RANK" in os.environ or os.getppid() == int(launcher)


def exec_torchrun(argv: list[str]) -> None:
    """Become `python -m torch.distributed.run ARGV`, set to die with the launching process.

    torchrun's agent does not notice its parent's death: after `kill -9` of `ckptflow run`
    it would keep its ranks training. PDEATHSIG survives exec; the ranks die with the agent
    (see `_die_with_parent`).
    """
    if not _die_with_parent():
        raise SystemExit("the launching process is gone; not starting torchrun")
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [TORCHRUN_AGENT_ARG]:
        exec_torchrun(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m ckptflow.worker")
    parser.add_argument(SERVE_ARG, action="store_true", help="train the attempts sent on stdin, one JSON line each")
    parser.add_argument("--job", type=Path)
    parser.add_argument("--plan", type=Path)
    args = parser.parse_args(argv)
    if not args.serve and (args.job is None or args.plan is None):
        parser.error(f"give --job and --plan, or {SERVE_ARG}")
    if not _die_with_parent():
        print("the launching process is gone; not training", file=sys.stderr)
        return 1
    logging.basicConfig(
        level=logging.INFO, stream=sys.stdout, format=f"%(asctime)s rank{os.environ.get('RANK', '0')} %(name)s: %(message)s"
    )
    quiet_libraries()
    install_redaction()  # the ledger URL arrives in the environment (ChunkJob.child_env)
    if args.serve:
        return serve(sys.stdin)
    job = ChunkJob.from_json(args.job.read_text())  # the ledger URL comes from the environment
    return _train(job, AttemptPlan.from_json(args.plan.read_text()))


def serve(requests: TextIO) -> int:
    """Train each attempt sent as a line of `requests` in this process; the exit code of the first failure, else 0.

    Between attempts the process stays warm: imports, and the run's tokenizer and data (warm.py).
    """
    for line in requests:
        request = json.loads(line)
        code = _train(ChunkJob.from_json(request["job"]), AttemptPlan.from_json(request["plan"]))
        if code != 0:
            return code
        sys.stderr.flush()
        print(f"{CHUNK_DONE_PREFIX}{request['seq']}", flush=True)
    return 0


def _train(job: ChunkJob, plan: AttemptPlan) -> int:
    """Train one attempt; the exit code for a failure the parent must not retry (others raise)."""
    try:
        train_attempt(job, plan)
    except InsufficientDiskError as exc:
        _report(exc)
        return EXIT_DISK_FULL
    except BadInputError as exc:  # e.g. the run's lease was taken over: retrying cannot help
        _report(exc)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    from ckptflow.fast_exit import exit_now

    exit_now(main())  # an exception (a crash the parent retries) still ends with the interpreter's traceback and exit 1
