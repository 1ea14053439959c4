"""Every benchmark script runs in --quick mode and prints its tables (no timing is asserted).

The training benchmarks start real processes (and Prefect's temporary server), so they are
marked slow; integrity and ledger take seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"

# script -> (results name, a caption its output must contain)
SCRIPTS = {
    "bench_integrity.py": ("integrity", "Reading and hashing"),
    "bench_ledger.py": ("ledger", "In-process calls"),
    "bench_stall.py": ("stall", "Per save, milliseconds"),
    "bench_resume.py": ("resume", "Start → first resumed step"),
    "bench_overhead.py": ("overhead", "Where the time went"),
    "bench_remote.py": ("remote", "ratio = throughput / local copy throughput"),
    "bench_cli.py": ("cli", "ratios against `ckptflow --help`"),
    "bench_logging.py": ("logging", "Per logged step"),
}
SLOW = {"bench_stall.py", "bench_resume.py", "bench_overhead.py", "bench_remote.py", "bench_cli.py", "bench_logging.py"}


def _run(args: list[str], results: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTFLOW_")}
    env["CKPTFLOW_BENCH_RESULTS"] = str(results)
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "script",
    [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in SCRIPTS],
)
def test_benchmark_quick_mode_prints_its_tables(script, tmp_path):
    name, caption = SCRIPTS[script]
    proc = _run([str(BENCH / script), "--quick"], tmp_path / "results", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert caption in proc.stdout and "\n|" in proc.stdout, proc.stdout[-3000:]
    doc = json.loads((tmp_path / "results" / f"{name}.json").read_text())
    assert doc["quick"] is True and doc["machine"]["cpus"] and len(doc["loadavg_end"]) == 3
    assert (tmp_path / "results" / f"{name}.md").read_text().startswith("### ")
    if script == "bench_integrity.py":  # `make test` never drops the machine's page cache
        assert doc["data"]["dropped_caches"] is False and "NOT dropped (no --drop-caches" in proc.stdout


def test_only_make_bench_asks_to_drop_the_page_cache():
    """Dropping caches is opt-in (`--drop-caches`), and only the Makefile's bench recipe passes it."""
    target, passing = None, set()
    for line in (BENCH.parent / "Makefile").read_text().splitlines():
        if line and not line.startswith(("\t", "#", " ")) and ":" in line:
            target = line.split(":")[0]
        elif line.startswith("\t") and "--drop-caches" in line:
            passing.add(target)
    assert passing == {"bench"}


def test_run_all_writes_a_summary(tmp_path):
    proc = _run([str(BENCH / "run_all.py"), "--quick", "--only", "integrity"], tmp_path / "results", 600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (tmp_path / "results" / "summary.md").read_text()
    assert "CPU cores" in summary and "torch" in summary and "load average" in summary
    assert "Integrity cost" in summary
