"""Where a chunk attempt trains: this process, the run's child process, or torchrun.

The child launchers turn a crash of the training process (non-zero exit, a signal such
as SIGKILL from the OOM killer) into an exception in the parent, which survives it; the
caller (a Prefect task with retries) then retries, resuming from the ledger. With
launcher=subprocess one child serves all chunks of a run (run_child.py); torchrun starts
per chunk.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ckptflow.chunks import AttemptPlan, ChunkJob, Launch, train_attempt
from ckptflow.errors import BadInputError, CkptflowError, InsufficientDiskError, LeaseLostError
from ckptflow.logline import STEP_LINE, is_step_line
from ckptflow.worker import ERROR_LINE_PREFIX, EXIT_BAD_INPUT, EXIT_DISK_FULL, PARENT_PID_ENV, TORCHRUN_AGENT_ARG

log = logging.getLogger(__name__)

# Set in every child's environment unless the caller set them: offline, no analytics.
CHILD_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# Lines of a failed child's output quoted in the error.
_TAIL_LINES = 40  # torchrun's own failure summary is ~20 lines: keep the rank's last words too
# How gloo / nccl report a collective that waited past the process group's timeout.
_COLLECTIVE_TIMEOUT = re.compile(r"timed out waiting|collective operation timeout|timeout\(ms\)=", re.IGNORECASE)


class ChunkProcessError(CkptflowError):
    """The training process of a chunk died or exited non-zero."""


def _child_error(code: int, tail: list[str]) -> CkptflowError | None:
    """The exception a child reported with an exit code of worker.py, if any."""
    report = next((line for line in reversed(tail) if line.startswith(ERROR_LINE_PREFIX)), None)
    if report is None or code not in (EXIT_BAD_INPUT, EXIT_DISK_FULL):
        return None
    try:
        message = json.loads(report.removeprefix(ERROR_LINE_PREFIX))["message"]
    except (ValueError, KeyError, TypeError):
        message = report
    if code == EXIT_DISK_FULL:
        return InsufficientDiskError(message)
    return LeaseLostError(message) if _report_type(report) == LeaseLostError.__name__ else BadInputError(message)


def _report_type(report: str) -> str | None:
    """The exception type named in a worker's error line."""
    try:
        return json.loads(report.removeprefix(ERROR_LINE_PREFIX)).get("type")
    except (ValueError, AttributeError):
        return None


def _describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (the OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with code {code}"


def child_env(job: ChunkJob) -> dict[str, str]:
    """The environment of a training process: ours, offline and quiet by default, the job's ledger URL, our pid."""
    return {**CHILD_ENV_DEFAULTS, **os.environ, **job.child_env(), PARENT_PID_ENV: str(os.getpid())}


def _worker_command(job_file: Path, plan_file: Path) -> list[str]:
    return [sys.executable, "-m", "ckptflow.worker", "--job", str(job_file), "--plan", str(plan_file)]


def _run_child(command: list[str], job: ChunkJob, plan: AttemptPlan) -> None:
    """Run `command`, stream its output into our log; raise on failure.

    A crash or signal raises ChunkProcessError (retryable); exits 2/3 of worker.py raise the
    BadInputError / InsufficientDiskError the child reported (retrying cannot help).
    """
    with tempfile.TemporaryDirectory(prefix="ckptflow-chunk-") as tmp:
        job_file, plan_file = Path(tmp) / "job.json", Path(tmp) / "plan.json"
        job_file.write_text(job.to_json())
        plan_file.write_text(plan.to_json())
        command = [arg.replace("{job}", str(job_file)).replace("{plan}", str(plan_file)) for arg in command]
        # The child dies with us (worker.py sets PDEATHSIG): no orphan keeps writing after `kill -9` of the flow.
        env = child_env(job)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
        try:
            tail, timed_out, _ = _stream(proc, job.chunk)
            code = proc.wait()
        except BaseException:
            _kill(proc)  # we raise (Ctrl-C, a Prefect cancel, a bug): the child must not train on unobserved
            raise
    if code != 0:
        raise _failure(job, proc.pid, code, tail, timed_out)


def _failure(job: ChunkJob, pid: int, code: int, tail: list[str], timed_out: str | None) -> CkptflowError:
    """The exception of a training process that exited with `code` (≠ 0) after printing `tail`."""
    reported = _child_error(code, tail)
    if reported is not None:
        return reported
    return ChunkProcessError(
        f"chunk {job.chunk} training process (pid {pid}) {_describe_exit(code)}"
        + _timeout_hint(job, timed_out)
        + "; last output:\n"
        + "\n".join(tail)
    )


def _timeout_hint(job: ChunkJob, timed_out: str | None) -> str:
    if timed_out is None:
        return ""
    seconds = job.settings.get("train", {}).get("ddp_timeout_seconds")
    return (
        f": a rank waited more than ddp_timeout_seconds={seconds} for the others (one hung or died); if it was only "
        f"slow, raise CKPTFLOW_TRAIN__DDP_TIMEOUT_SECONDS [{timed_out.strip()[:300]}]"
    )


def _stream(proc: subprocess.Popen, chunk: int, until: str | None = None) -> tuple[list[str], str | None, bool]:
    """Log the child's output as it comes, to its end or to the line `until` (not logged).

    Returns the last lines, the first collective-timeout line if any, and whether `until` came.
    """
    assert proc.stdout is not None
    tail: list[str] = []
    timed_out = None
    for line in proc.stdout:
        line = line.rstrip()
        if until is not None and line == until:
            return tail, timed_out, True
        tail = (tail + [line])[-_TAIL_LINES:]
        if timed_out is None and _COLLECTIVE_TIMEOUT.search(line):
            timed_out = line
        log.info("[chunk %d] %s", chunk, line, extra={STEP_LINE: is_step_line(line)})  # step lines: batched for Prefect
    return tail, timed_out, False


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the child and reap it (torchrun's ranks die with their agent: PDEATHSIG, see worker.py)."""
    if proc.poll() is None:
        log.warning("killing training process %d: its launcher is failing", proc.pid)
        proc.kill()
    proc.wait()


def launch_inprocess(job: ChunkJob, plan: AttemptPlan) -> None:
    train_attempt(job, plan)
    if plan.total_steps is not None and job.end_step >= plan.total_steps:  # the run's last chunk
        from ckptflow import warm

        warm.release()


def launch_subprocess(job: ChunkJob, plan: AttemptPlan) -> None:
    """Train in the run's child process: started by the run's first chunk (or after a crash), kept warm for the next."""
    from ckptflow.run_child import train_in_run_child

    train_in_run_child(job, plan)


def launch_torchrun(job: ChunkJob, plan: AttemptPlan) -> None:
    """One `torchrun --standalone --nproc-per-node N` for the chunk (gloo on CPU, nccl with CUDA).

    torchrun's own failure handling tears the chunk down: when a rank dies, the agent stops
    the others and exits non-zero (no restarts), which raises ChunkProcessError here (retryable).
    """
    nproc = job.settings["train"]["nproc_per_node"]
    agent = [sys.executable, "-m", "ckptflow.worker", TORCHRUN_AGENT_ARG]  # torchrun, dying with us
    command = agent + ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0"]
    command += _worker_command(Path("{job}"), Path("{plan}"))[1:]
    _run_child(command, job, plan)


LAUNCHERS: dict[str, Launch] = {
    "inprocess": launch_inprocess,
    "subprocess": launch_subprocess,
    "torchrun": launch_torchrun,
}


def launcher(name: str) -> Launch:
    return LAUNCHERS[name]
