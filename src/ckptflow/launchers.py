"""Where a chunk attempt trains: this process, a child process, or torchrun.

The child launchers turn a crash of the training process (non-zero exit, a signal such
as SIGKILL from the OOM killer) into an exception in the parent, which survives it; the
caller (a Prefect task with retries) then retries, resuming from the ledger.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ckptflow.chunks import AttemptPlan, ChunkJob, Launch, train_attempt
from ckptflow.errors import CkptflowError

log = logging.getLogger(__name__)


class ChunkProcessError(CkptflowError):
    """The training process of a chunk died or exited non-zero."""


def _describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with code {code}"


def _worker_command(job_file: Path, plan_file: Path) -> list[str]:
    return [sys.executable, "-m", "ckptflow.worker", "--job", str(job_file), "--plan", str(plan_file)]


def _run_child(command: list[str], job: ChunkJob, plan: AttemptPlan) -> None:
    """Run `command`, stream its output into our log, raise ChunkProcessError on failure."""
    with tempfile.TemporaryDirectory(prefix="ckptflow-chunk-") as tmp:
        job_file, plan_file = Path(tmp) / "job.json", Path(tmp) / "plan.json"
        job_file.write_text(job.to_json())
        plan_file.write_text(plan.to_json())
        command = [arg.replace("{job}", str(job_file)).replace("{plan}", str(plan_file)) for arg in command]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            line = line.rstrip()
            tail = (tail + [line])[-20:]
            log.info("[chunk %d] %s", job.chunk, line)
        code = proc.wait()
    if code != 0:
        raise ChunkProcessError(
            f"chunk {job.chunk} training process (pid {proc.pid}) {_describe_exit(code)}; last output:\n" + "\n".join(tail)
        )


def launch_inprocess(job: ChunkJob, plan: AttemptPlan) -> None:
    train_attempt(job, plan)


def launch_subprocess(job: ChunkJob, plan: AttemptPlan) -> None:
    _run_child(_worker_command(Path("{job}"), Path("{plan}")), job, plan)


def launch_torchrun(job: ChunkJob, plan: AttemptPlan) -> None:
    nproc = job.settings["train"]["nproc_per_node"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += _worker_command(Path("{job}"), Path("{plan}"))[1:]
    _run_child(command, job, plan)


LAUNCHERS: dict[str, Launch] = {
    "inprocess": launch_inprocess,
    "subprocess": launch_subprocess,
    "torchrun": launch_torchrun,
}


def launcher(name: str) -> Launch:
    return LAUNCHERS[name]
