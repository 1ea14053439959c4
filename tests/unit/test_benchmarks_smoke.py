"""Every benchmark script runs in --quick mode and prints its tables (no timing is asserted).

One `run_all.py --quick --jobs 2` process runs them all, two at a time (what `make bench` runs,
at tiny sizes); each script's test then reads its own section of that output and its own
results. The training benchmarks start real processes (and Prefect servers), so all are slow.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Seconds the whole quick run may take on a busy 2-core machine (all eight benchmarks, in one fixture).
QUICK_RUN_TIMEOUT_S = 1500
pytestmark = [pytest.mark.slow, pytest.mark.timeout(QUICK_RUN_TIMEOUT_S + 300)]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

# results name -> (script, a caption its output must contain); longest first, so two at a time end together.
SCRIPTS = {
    "resume": ("bench_resume.py", "Start → first resumed step"),
    "overhead": ("bench_overhead.py", "Where the time went"),
    "cli": ("bench_cli.py", "ratios against `ckptflow --help`"),
    "logging": ("bench_logging.py", "Per logged step"),
    "stall": ("bench_stall.py", "Per save, milliseconds"),
    "remote": ("bench_remote.py", "ratio = throughput / local copy throughput"),
    "integrity": ("bench_integrity.py", "Reading and hashing"),
    "ledger": ("bench_ledger.py", "In-process calls"),
}
# Benchmarks run side by side in the smoke run (2 cores: more would only queue).
JOBS = 2


@dataclass(frozen=True)
class QuickRun:
    proc: subprocess.CompletedProcess
    results: Path
    sections: dict[str, str]  # benchmark name -> its output, from its `===== name (script) =====` header on


def _run(args: list[str], results: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTFLOW_")}
    env["CKPTFLOW_BENCH_RESULTS"] = str(results)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _sections(stdout: str) -> dict[str, str]:
    out = {}
    for name, (script, _caption) in SCRIPTS.items():
        start = stdout.find(f"===== {name} ({script}) =====")
        if start >= 0:
            end = stdout.find("\n===== ", start + 1)
            out[name] = stdout[start : end if end >= 0 else len(stdout)]
    return out


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> QuickRun:
    """One `run_all.py --quick --jobs 2` over every script; a timeout ends the benchmarks it started too."""
    results = tmp_path_factory.mktemp("bench") / "results"
    args = [sys.executable, str(BENCH / "run_all.py"), "--quick", "--jobs", str(JOBS), "--only", *SCRIPTS]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTFLOW_")}
    env["CKPTFLOW_BENCH_RESULTS"] = str(results)
    with subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:  # fmt: skip
        try:
            stdout, stderr = popen.communicate(timeout=QUICK_RUN_TIMEOUT_S)
        finally:
            if popen.poll() is None:  # every descendant: Prefect servers run in sessions of their own
                import psutil

                stray = psutil.Process(popen.pid).children(recursive=True)
                os.killpg(popen.pid, signal.SIGKILL)
                for child in stray:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        child.kill()
    proc = subprocess.CompletedProcess(args, popen.returncode, stdout, stderr)
    return QuickRun(proc, results, _sections(stdout))


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_benchmark_quick_mode_prints_its_tables(name, quick_run):
    script, caption = SCRIPTS[name]
    output = quick_run.sections.get(name)
    assert output is not None, f"no output of {script}:\n" + quick_run.proc.stdout[-3000:] + quick_run.proc.stderr[-3000:]
    summary = json.loads((quick_run.results / "summary.json").read_text())
    assert name not in summary["failed"], output[-6000:]
    assert caption in output and "\n|" in output, output[-3000:]
    doc = json.loads((quick_run.results / f"{name}.json").read_text())
    assert doc["quick"] is True and doc["machine"]["cpus"] and len(doc["loadavg_end"]) == 3
    assert (quick_run.results / f"{name}.md").read_text().startswith("### ")
    if name == "integrity":  # `make test` never drops the machine's page cache
        assert doc["data"]["dropped_caches"] is False and "NOT dropped (no --drop-caches" in output


def test_run_all_writes_a_summary(quick_run):
    assert quick_run.proc.returncode == 0, quick_run.proc.stdout[-3000:] + quick_run.proc.stderr[-3000:]
    summary = (quick_run.results / "summary.md").read_text()
    assert "CPU cores" in summary and "torch" in summary and "load average" in summary
    assert "Integrity cost" in summary and "FAILED" not in summary
    titles = [(quick_run.results / f"{name}.md").read_text().splitlines()[0] for name in SCRIPTS]
    assert all(title in summary for title in titles)  # every benchmark's tables, under its own title


def test_run_all_one_at_a_time_writes_a_summary(tmp_path):
    """`make bench`'s way (no --jobs): each benchmark streams its output under its header, then the summary."""
    proc = _run([str(BENCH / "run_all.py"), "--quick", "--only", "integrity"], tmp_path / "results", 600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "===== integrity (bench_integrity.py) =====" in proc.stdout
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "CPU cores" in summary and "Integrity cost" in summary and "FAILED" not in summary


def test_jobs_is_refused_outside_quick_mode(tmp_path):
    """Side by side, benchmarks disturb each other's numbers: only the quick smoke run may do that."""
    proc = _run([str(BENCH / "run_all.py"), "--jobs", "2", "--only", "integrity"], tmp_path / "results", 120)
    assert proc.returncode == 2 and "only with --quick" in proc.stderr
    assert not (tmp_path / "results").exists()


def test_only_make_bench_asks_to_drop_the_page_cache():
    """Dropping caches is opt-in (`--drop-caches`), and only the Makefile's bench recipe passes it."""
    target, passing = None, set()
    for line in (BENCH.parent / "Makefile").read_text().splitlines():
        if line and not line.startswith(("\t", "#", " ")) and ":" in line:
            target = line.split(":")[0]
        elif line.startswith("\t") and "--drop-caches" in line:
            passing.add(target)
    assert passing == {"bench"}
