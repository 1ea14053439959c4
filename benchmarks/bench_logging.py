"""Benchmark 9 — what training log lines cost on their way to the Prefect API.

A flow with one task stands in for a chunk: N steps, each a fixed piece of work (SHA-256 of
4 MiB: a few ms that, like torch, release the GIL) followed by one step line through ckptflow's
logger, exactly as LogCallback logs at `logging_steps=1`. Each variant is a fresh process
against one running `prefect server start`:

  no-api     PREFECT_LOGGING_TO_API_ENABLED=false: lines go to the console only      [baseline]
  per-line   every step line is its own API record (ckptflow before issue 13)
  batched    step lines held and sent as one record per batch interval (tasks/step_lines.py)
  batched+plain  also written as plain text to the console, which is a pipe here, instead of via rich

Measured from the first step until the server has stored the last line: wall and CPU of the
stepping process, CPU of the server's process group, and the records the server stored. The per-step API cost is (variant − no-api) / steps.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

VARIANTS = {
    "no-api": "console only (PREFECT_LOGGING_TO_API_ENABLED=false), via rich",
    "per-line": "one API record per step line",
    "batched": "step lines batched (tasks/step_lines.py)",
    "batched+plain": "batched, and plain text to the non-terminal console (what train_chunk does)",
}
# Logs read back per API call (the server's default page limit).
PAGE = 200
WORK = b"x" * (4 * 2**20)  # hashed once per step: a few ms of GIL-free CPU on one core


def _session_cpu(session: int) -> float:
    """CPU seconds (user + system) of every live process in `session` (the server and its workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # fields after "(comm)": state ppid pgrp session …
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def child(variant: str, steps: int, server_session: int) -> None:
    """Run the stand-in chunk and print one JSON line: wall, CPU (this process, the server), records stored."""
    import logging

    from prefect import flow, get_client, task
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.context import get_run_context
    from prefect.logging.handlers import APILogWorker

    from ckptflow.logline import STEP_LINE, format_log_line
    from tasks.step_lines import batched_step_lines, plain_console_step_lines

    log = logging.getLogger("ckptflow.chunks")
    logging.getLogger("ckptflow").setLevel(logging.INFO)

    def stepping() -> dict:
        t0, cpu0 = time.perf_counter(), time.process_time()
        for step in range(1, steps + 1):
            hashlib.sha256(WORK).digest()
            line = format_log_line(step, steps, {"loss": 6.3, "learning_rate": 2e-4, "grad_norm": 0.21}, 25.0)
            log.info("%s", line, extra={STEP_LINE: True})
        return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - cpu0}

    def window(body) -> dict:
        """The steps, then until the server stored their lines: this process's and the server's CPU in between."""
        server0 = _session_cpu(server_session)
        result = body()
        cpu0 = time.process_time()
        if variant != "no-api":
            APILogWorker.drain_all(timeout=60)
        time.sleep(1.0)  # the server finishes storing the last request (the same pause in every variant)
        result["cpu"] += time.process_time() - cpu0
        result["server_cpu"] = _session_cpu(server_session) - server0
        return result

    @task
    def chunk() -> dict:
        ctx = get_run_context()

        def quieted() -> dict:
            with contextlib.ExitStack() as stack:
                if variant.startswith("batched"):
                    stack.enter_context(batched_step_lines((str(ctx.task_run.flow_run_id), str(ctx.task_run.id))))
                if variant.endswith("+plain"):
                    stack.enter_context(plain_console_step_lines())
                return stepping()

        return window(quieted)

    @flow
    def stand_in() -> dict:
        return chunk()

    state = stand_in(return_state=True)
    result = state.result()
    logs, only_this_run = [], LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        while page := client.read_logs(log_filter=only_this_run, limit=PAGE, offset=len(logs)):  # the API pages
            logs += page
    result["records"] = sum(1 for entry in logs if entry.name.startswith("ckptflow"))
    result["lines"] = sum(entry.message.count("\n") + 1 for entry in logs if entry.name.startswith("ckptflow"))
    print("RESULT " + json.dumps(result), flush=True)


def run_variant(variant: str, steps: int, server: C.PrefectServer, prefect_home: Path) -> dict:
    env = C.base_env(prefect_home=prefect_home, PREFECT_API_URL=server.url, PREFECT_LOGGING_EXTRA_LOGGERS="ckptflow")
    env["PYTHONPATH"] = os.pathsep.join([str(C.TREE / "src"), str(C.TREE)])
    if variant == "no-api":
        env["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
    command = [C.PYTHON, __file__, "--child", variant, "--steps", str(steps), "--server-session", str(server.proc.pid)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--child", choices=list(VARIANTS), help=argparse_hidden())
    p.add_argument("--steps", type=int, default=0, help=argparse_hidden())
    p.add_argument("--server-session", type=int, default=0, help=argparse_hidden())
    args = p.parse_args()
    if args.child:
        child(args.child, args.steps, args.server_session)
        return
    steps, rounds = (60, 1) if args.quick else (1500, 3)
    report = C.Report("logging", "9. Training log lines to the Prefect API: per line vs batched", args.quick)
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with C.Workdir(args, "logging") as work:
        prefect_home = work / "prefect-home"
        C.warm_prefect_home(prefect_home)
        with C.PrefectServer(prefect_home, work / "prefect-server.log") as server:
            for round_ in range(rounds):  # variants interleaved: a load change hits all of them
                for variant in VARIANTS:
                    r = run_variant(variant, steps, server, prefect_home)
                    runs[variant].append(r)
                    print(f"[logging] round {round_ + 1} {variant}: {r['wall']:.2f}s, {r['records']} records", flush=True)
    med = {v: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "server_cpu", "records", "lines")}
           for v, rs in runs.items()}  # fmt: skip
    base = med["no-api"]
    rows = []
    for variant, what in VARIANTS.items():
        m = med[variant]
        extra_cpu = (m["cpu"] + m["server_cpu"] - base["cpu"] - base["server_cpu"]) / steps * 1e3
        rows.append([variant, what, steps, int(m["records"]), int(m["lines"]), m["wall"] / steps * 1e3,
                     C.ratio(m["wall"], base["wall"]), m["cpu"] / steps * 1e3, m["server_cpu"] / steps * 1e3,
                     extra_cpu])  # fmt: skip
    report.data.update({"steps": steps, "rounds": rounds, "runs": runs, "median": med})
    report.table(
        f"Per logged step (milliseconds, median of {rounds}; ratio and extra CPU against no-api, same server, same run)",
        ["variant", "what", "steps", "API records", "lines in them", "wall ms/step", "wall ratio",
         "CPU ms/step (process)", "CPU ms/step (server)", "extra CPU ms/step"],
        rows,
    )  # fmt: skip
    report.note(
        "- extra CPU = (process + server CPU of the variant − those of no-api) / steps: what sending the lines costs "
        "on the cores that train. Each step's work is SHA-256 of 4 MiB (a few ms, GIL released, like torch)."
    )
    report.save()


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
