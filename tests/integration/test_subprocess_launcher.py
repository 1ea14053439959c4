"""launcher=subprocess: the chunk's training process is SIGKILLed; the flow survives, Prefect retries, the retry resumes."""

from __future__ import annotations

from uuid import UUID

import pytest
from ckptflow.ledger import AttemptStatus, Ledger, RunStatus

from tests.drills import DRILL_ENV, export_diff, final_diff

pytestmark = pytest.mark.slow


def _drill_overrides() -> dict:
    out: dict = {}
    for key, value in DRILL_ENV.items():
        group, field = key.removeprefix("CKPTFLOW_").lower().split("__")
        out.setdefault(group, {})[field] = value
    return out


def test_child_killed_mid_chunk_is_retried_by_prefect_and_resumes_bit_identical(home, prefect_harness, monkeypatch):
    from flows.finetune import finetune
    from prefect.client.orchestration import get_client

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the children's numerics match the reference's
    overrides = _drill_overrides()
    overrides["train"] |= {"launcher": "subprocess", "retry_delay_seconds": 0}
    # The first attempt of chunk 1 (steps 4-8) SIGKILLs its own process at step 6, before saving it.
    overrides["fault"] = {"at_step": 6, "mode": "kill", "times": 1}

    result = finetune(run_name="sub", overrides=overrides)  # this process is the parent: it survives
    assert result["status"] == "completed"

    with Ledger(f"sqlite:///{home / 'ledger.db'}") as ledger:
        run = ledger.get_run("sub")
        attempts = ledger.attempts(run.id)
    assert run.status == RunStatus.COMPLETED
    assert [(a.chunk, a.attempt, a.status, a.resumed_from_step) for a in attempts] == [
        (0, 1, AttemptStatus.COMPLETED, None),
        (1, 1, AttemptStatus.FAILED, 4),
        (1, 2, AttemptStatus.COMPLETED, 4),
    ]
    assert "killed by SIGKILL" in attempts[1].error
    # Both attempts of chunk 1 belong to one Prefect task run: Prefect retried it.
    assert attempts[1].prefect_task_run_id == attempts[2].prefect_task_run_id is not None
    with get_client(sync_client=True) as client:
        task_run = client.read_task_run(UUID(attempts[2].prefect_task_run_id))
    assert task_run.state.is_completed() and task_run.run_count == 2
    assert final_diff(home, "sub") == 0.0
    assert export_diff(home, "sub") == 0.0


@pytest.mark.parametrize(
    ("code", "line", "expected"),
    [
        (3, 'ckptflow-error: {"type": "InsufficientDiskError", "message": "disk full: free 2 MB"}', "InsufficientDiskError"),
        (2, 'ckptflow-error: {"type": "RunLockedError", "message": "lease lost"}', "BadInputError"),
        (1, "Traceback: boom", "ChunkProcessError"),
        (-9, "", "ChunkProcessError"),
    ],
)
def test_child_exit_becomes_the_right_exception(tmp_path, code, line, expected):
    """Exit 3/2 of a worker are not retried (disk full, bad input); a crash or a signal is."""
    import sys

    from ckptflow.chunks import AttemptPlan, ChunkJob
    from ckptflow.errors import BadInputError, InsufficientDiskError
    from ckptflow.launchers import ChunkProcessError, _run_child

    body = f"import os, signal; print({line!r}, flush=True); "
    body += "os.kill(os.getpid(), signal.SIGKILL)" if code < 0 else f"raise SystemExit({code})"
    job = ChunkJob("sqlite://", "r", 1, 4, 8, {})
    plan = AttemptPlan(1, 1, 4, None)
    types = {"InsufficientDiskError": InsufficientDiskError, "BadInputError": BadInputError, "ChunkProcessError": ChunkProcessError}
    with pytest.raises(types[expected]) as info:
        _run_child([sys.executable, "-c", body], job, plan)
    assert type(info.value).__name__ == expected
    if code < 0:
        assert "killed by SIGKILL (the OOM killer sends SIGKILL)" in str(info.value)
    elif code > 1:
        assert str(info.value) in line


def test_worker_dies_with_its_launcher(tmp_path):
    """kill -9 of the process that launched a worker kills the worker too (no orphan keeps writing)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    worker = (
        "import time; from ckptflow.worker import _die_with_parent; "
        "assert _die_with_parent(); print('ready', flush=True); time.sleep(120)"
    )
    launcher = (
        "import os, subprocess, sys, time\n"
        f"env = {{**os.environ, 'CKPTFLOW_LAUNCHER_PID': str(os.getpid())}}\n"
        f"p = subprocess.Popen([sys.executable, '-c', {worker!r}], env=env, stdout=subprocess.PIPE, text=True)\n"
        "assert p.stdout.readline().strip() == 'ready'\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and psutil.pid_exists(child_pid):
        try:
            if psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    alive = psutil.pid_exists(child_pid) and psutil.Process(child_pid).status() != psutil.STATUS_ZOMBIE
    assert not alive
