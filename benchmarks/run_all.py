"""Run every benchmark (issues 6 and 13) in one go (what `make bench` does) and write one summary.

    python benchmarks/run_all.py            # full: about 15 minutes on 2 CPU cores
    python benchmarks/run_all.py --quick    # tiny sizes, a few minutes: checks that everything runs
    python benchmarks/run_all.py --quick --jobs 2   # the same, two benchmarks at a time (what `make test` does)
    python benchmarks/run_all.py --only integrity ledger
    python benchmarks/run_all.py --drop-caches   # `make bench`: cold reads really cold (root; slows the machine)

Each benchmark runs as its own process (one at a time), prints its tables, and writes
benchmarks/results/<name>.{md,json}; this script then writes benchmarks/results/summary.md:
machine, versions, load averages, the source tree measured, and every table. With --quick,
--jobs N runs N benchmarks side by side (their numbers disturb each other, and quick numbers
mean little anyway); each one's output is printed whole, under its `===== name` header, when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

# name -> script, in the order
BENCHMARKS = {
    "overhead": "bench_overhead.py",
    "resume": "bench_resume.py",
    "integrity": "bench_integrity.py",
    "ledger": "bench_ledger.py",
    "stall": "bench_stall.py",
    "remote": "bench_remote.py",
    "ddp": "bench_ddp.py",
    "cli": "bench_cli.py",
    "logging": "bench_logging.py",
}
# Side by side: one torch thread per benchmark (two processes with a thread per core each would
# oversubscribe the cores and spin), and more time for a Prefect temporary server to come up.
SIDE_BY_SIDE_ENV = {"OMP_NUM_THREADS": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}


def tree_state() -> str:
    """The commit measured, and whether the working tree had local changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=C.TREE, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "flows", "tasks"], cwd=C.TREE,
                               capture_output=True, text=True)  # fmt: skip
    except OSError:
        return f"{C.TREE} (not a git checkout)"
    if rev.returncode != 0:
        return f"{C.TREE} (not a git checkout)"
    changed = len([line for line in dirty.stdout.splitlines() if line.strip()])
    return f"{rev.stdout.strip()}" + (f" + {changed} locally changed files under src/, flows/, tasks/" if changed else "")


def header(name: str) -> str:
    """The line that opens a benchmark's output (the smoke test splits the output at it)."""
    return f"===== {name} ({BENCHMARKS[name]}) ====="


def command(name: str, args: argparse.Namespace) -> list[str]:
    cmd = [C.PYTHON, str(C.BENCH_DIR / BENCHMARKS[name])] + (["--quick"] if args.quick else [])
    if args.drop_caches and name == "integrity":  # the only benchmark that reads cold
        cmd.append("--drop-caches")
    return cmd


def run_side_by_side(commands: dict[str, list[str]], jobs: int) -> list[str]:
    """Run `jobs` benchmarks at a time, in the given order; print each one's output whole when it ends.

    Returns the names of those that failed, in the given order."""
    env = {**os.environ, **SIDE_BY_SIDE_ENV}
    printing = threading.Lock()

    def run(name: str) -> bool:
        t0 = time.monotonic()
        proc = subprocess.run(commands[name], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ended = "ok" if proc.returncode == 0 else f"exited {proc.returncode}"
        with printing:  # one benchmark's output stays in one piece
            print(f"\n{header(name)}\n{proc.stdout}", end="", flush=True)
            print(f"[{name}] {ended} after {time.monotonic() - t0:.0f} s (side by side)", flush=True)
        return proc.returncode == 0

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        ok = dict(zip(commands, pool.map(run, commands)))
    return [name for name, passed in ok.items() if not passed]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (checks that everything runs)")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these")
    p.add_argument("--drop-caches", action="store_true", help="integrity: drop the page cache before cold reads (root)")
    p.add_argument("--jobs", type=int, default=1, help="with --quick: run this many benchmarks at a time")
    args = p.parse_args()
    if args.jobs > 1 and not args.quick:
        p.error("--jobs runs benchmarks side by side, which disturbs their numbers: only with --quick")
    names = args.only or list(BENCHMARKS)
    load_start, t0 = C.loadavg(), time.monotonic()
    commands = {name: command(name, args) for name in names}
    if args.jobs > 1:
        failed = run_side_by_side(commands, args.jobs)
    else:
        failed = []
        for name, cmd in commands.items():
            print(f"\n{header(name)}", flush=True)
            if subprocess.run(cmd).returncode != 0:
                failed.append(name)
    minutes = (time.monotonic() - t0) / 60
    machine = C.machine()
    v = machine["versions"]
    preamble = [
        f"# ckptflow benchmarks{' (--quick: numbers mean little)' if args.quick else ''}",
        "",
        f"- machine: {machine['cpus']} CPU cores ({machine['cpu_model']}), Linux {machine['kernel']}, "
        f"Python {machine['python']}",
        f"- versions: torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, peft {v['peft']}, "
        f"prefect {v['prefect']}, sqlalchemy {v['sqlalchemy']}",
        f"- tree measured: {tree_state()}",
        f"- load average (1/5/15 min): {load_start} at start, {C.loadavg()} at end; whole run {minutes:.1f} min",
        f"- workload (1, 2, 5): {C.MODEL} (GPT-2, 4 layers, width 256) + LoRA r=8 on {C.DATA} (512 texts), "
        f"batch {C.BATCH_SIZE}, CPU",
    ]
    parts = ["\n".join(preamble)]
    for name in names:
        md = C.RESULTS_DIR / f"{name}.md"
        parts.append(md.read_text() if md.is_file() and name not in failed else f"### {name}: FAILED")
    summary = "\n\n".join(parts) + "\n"
    C.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (C.RESULTS_DIR / "summary.md").write_text(summary)
    (C.RESULTS_DIR / "summary.json").write_text(json.dumps(
        {"quick": args.quick, "machine": machine, "tree": tree_state(), "minutes": minutes, "failed": failed,
         "loadavg_start": load_start, "loadavg_end": C.loadavg()}, indent=2) + "\n")  # fmt: skip
    print(f"\nsummary: {C.RESULTS_DIR / 'summary.md'} ({minutes:.1f} min)" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
