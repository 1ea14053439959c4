"""Shared benchmark plumbing: the workload, isolated environments, probed processes, tables, results.

Every benchmark measures its baseline in the same run (same machine, same load) and prints
ratios against it. Results go to benchmarks/results/<name>.json and .md (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
# Where tables and raw numbers go; the smoke test points this at a temporary directory.
RESULTS_DIR = Path(os.environ.get("CKPTFLOW_BENCH_RESULTS") or BENCH_DIR / "results")
PROBE_DIR = BENCH_DIR / "_probe"
PYTHON = sys.executable
CKPTFLOW = str(Path(sys.executable).with_name("ckptflow"))
BARE_SCRIPT = BENCH_DIR / "bare_sft.py"
# Measure another copy of the source tree (e.g. one with a proposed change applied):
# CKPTFLOW_BENCH_TREE=/path/to/tree puts its src/ and root ahead of the installed package.
TREE = Path(os.environ.get("CKPTFLOW_BENCH_TREE") or ROOT).resolve()

# The workload of the training benchmarks (issue 6): a GPT-2 with 4 layers of width 256
# built from config, LoRA (ckptflow's defaults), the 512-row built-in dataset.
MODEL = "builtin:bench-gpt2"
DATA = "builtin:demo-large"
BATCH_SIZE = 8
SAVE_TOTAL_LIMIT = 2

# Environment every benchmark process gets: offline, quiet, no analytics.
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTHONWARNINGS": "ignore",
}


# -- arguments and the work directory -------------------------------------------------------
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the script works, numbers mean little")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a fresh temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    return p


class Workdir:
    """A scratch directory on the same disk as /tmp, removed at the end unless --keep."""

    def __init__(self, args: argparse.Namespace, name: str) -> None:
        self.keep = args.keep or args.workdir is not None
        if args.workdir is not None:
            self.path = args.workdir.resolve()
            self.path.mkdir(parents=True, exist_ok=True)
        else:
            self.path = Path(tempfile.mkdtemp(prefix=f"ckptflow-bench-{name}-"))

    def __enter__(self) -> Path:
        compile_tree()  # every benchmark comes through here before its first timed process
        return self.path

    def __exit__(self, *exc: object) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)


def base_env(home: Path | None = None, *, prefect_home: Path | None = None, **extra: str) -> dict[str, str]:
    """os.environ without CKPTFLOW_*/PREFECT_API_URL, plus the quiet settings and the probe on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKPTFLOW_") and k != "PREFECT_API_URL"}
    env.update(QUIET_ENV)
    env["PYTHONPATH"] = os.pathsep.join([str(PROBE_DIR), str(TREE / "src"), str(TREE)])
    if home is not None:
        env["CKPTFLOW_HOME"] = str(home)
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def ckptflow_env(
    home: Path,
    *,
    total_steps: int,
    save_steps: int,
    chunk_steps: int = 0,
    launcher: str = "inprocess",
    prefect_home: Path | None = None,
    **extra: str,
) -> dict[str, str]:
    """Environment of a `ckptflow run` on the benchmark workload."""
    settings = {
        "CKPTFLOW_MODEL__NAME_OR_PATH": MODEL,
        "CKPTFLOW_DATA__TRAIN": DATA,
        "CKPTFLOW_TRAIN__BATCH_SIZE": BATCH_SIZE,
        "CKPTFLOW_TRAIN__MAX_STEPS": total_steps,
        "CKPTFLOW_TRAIN__CHUNK_STEPS": chunk_steps,
        "CKPTFLOW_TRAIN__LAUNCHER": launcher,
        "CKPTFLOW_CHECKPOINT__SAVE_STEPS": save_steps,
        "CKPTFLOW_CHECKPOINT__EVAL_STEPS": save_steps,
        "CKPTFLOW_CHECKPOINT__SAVE_TOTAL_LIMIT": SAVE_TOTAL_LIMIT,
    }
    return base_env(home, prefect_home=prefect_home, **{k: str(v) for k, v in settings.items()}, **extra)


def bare_args(model_dir: Path, data_dir: Path, out_dir: Path, *, total_steps: int, save_steps: int,
              precision: str = "default") -> list[str]:  # fmt: skip
    """Command line of the bare SFTTrainer script on the same workload (precision: TRL's default, or pinned)."""
    return [
        PYTHON, str(BARE_SCRIPT),
        "--model", str(model_dir), "--data", str(data_dir), "--out", str(out_dir),
        "--max-steps", str(total_steps), "--save-steps", str(save_steps),
        "--batch-size", str(BATCH_SIZE), "--save-total-limit", str(SAVE_TOTAL_LIMIT), "--precision", precision,
    ]  # fmt: skip


def compile_tree() -> None:
    """Bytecode of the measured tree's own modules, as on any machine after its first run (or a wheel install):
    where Python may not write it (PYTHONDONTWRITEBYTECODE), every ckptflow process would compile them again."""
    dirs = [str(TREE / d) for d in ("src", "flows", "tasks", "deployments") if (TREE / d).is_dir()]
    subprocess.run([PYTHON, "-m", "compileall", "-q", *dirs], check=True, capture_output=True)


def prepare_workload(work: Path) -> tuple[Path, Path, Path]:
    """(ckptflow home with bench-gpt2 built, the model directory, a directory of train/eval jsonl).

    Built once per work directory, outside any timed region, so no run pays the build.
    """
    home = work / "home"
    marker = work / "workload.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        return home, Path(info["model_dir"]), Path(info["data_dir"])
    code = (
        "import json, sys; from pathlib import Path\n"
        "from ckptflow.builtin import materialize_builtin, demo_large_texts\n"
        f"model = materialize_builtin({MODEL!r}, Path(sys.argv[1]))\n"
        "train, ev = demo_large_texts()\n"
        "d = Path(sys.argv[2]); d.mkdir(parents=True, exist_ok=True)\n"
        "for name, rows in (('train', train), ('eval', ev)):\n"
        "    (d / f'{name}.jsonl').write_text(''.join(json.dumps({'text': t}) + '\\n' for t in rows))\n"
        "print(model)\n"
    )
    data_dir = work / "data"
    env = base_env(home)
    env.pop("CKPTFLOW_BENCH_PROBE", None)
    out = subprocess.run([PYTHON, "-c", code, str(home), str(data_dir)], env=env, check=True, capture_output=True, text=True)
    model_dir = Path(out.stdout.strip().splitlines()[-1])
    marker.write_text(json.dumps({"model_dir": str(model_dir), "data_dir": str(data_dir)}))
    return home, model_dir, data_dir


def warm_prefect_home(prefect_home: Path) -> float:
    """Create the Prefect database once (migrations), like any machine after its first run; returns seconds."""
    t0 = time.monotonic()
    env = base_env(prefect_home=prefect_home)
    subprocess.run(
        [str(Path(PYTHON).with_name("prefect")), "server", "database", "upgrade", "-y"],
        env=env, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return time.monotonic() - t0


class PrefectServer:
    """A `prefect server start` on 127.0.0.1 (our own process group), for runs that reuse one server."""

    def __init__(self, prefect_home: Path, log_file: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.prefect_home = prefect_home
        self.log_file = log_file
        self.proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None

    def __enter__(self) -> PrefectServer:
        import urllib.request

        env = base_env(prefect_home=self.prefect_home, PREFECT_UI_ENABLED="false")
        t0 = time.monotonic()
        self._log = open(self.log_file, "w")
        self.proc = subprocess.Popen(
            [str(Path(PYTHON).with_name("prefect")), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        while time.monotonic() - t0 < 120:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prefect server exited {self.proc.returncode}; see {self.log_file}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as r:
                    if r.status == 200:
                        self.startup_seconds = time.monotonic() - t0
                        return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"prefect server did not become healthy in 120 s; see {self.log_file}")

    def __exit__(self, *exc: object) -> None:
        import signal

        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group we created: the server and its children only
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


# -- probed processes -----------------------------------------------------------------------
@dataclass
class Proc:
    """One measured process: wall time from the parent, and the probe records of it and its children."""

    label: str
    wall: float
    returncode: int
    t_spawn: float
    t_end: float
    probes: list[dict[str, Any]]
    stderr_tail: str = ""
    stdout: str = ""
    cpu: float = 0.0

    @property
    def main(self) -> dict[str, Any]:
        """The probe of the process we started (the lowest pid that ran our command)."""
        return min(self.probes, key=lambda p: p["t_site"]) if self.probes else {}

    def spans(self, name: str | None = None, *, prefix: str | None = None) -> list[dict[str, Any]]:
        out = []
        for p in self.probes:
            for s in p["spans"]:
                if (name is None or s["n"] == name) and (prefix is None or s["n"].startswith(prefix)):
                    out.append(s)
        return sorted(out, key=lambda s: s["t0"])

    def total(self, name: str | None = None, *, prefix: str | None = None) -> float:
        """Seconds in spans of that name, outermost only (nested same-name spans are not added twice)."""
        total, end = 0.0, float("-inf")
        for s in self.spans(name, prefix=prefix):
            if s["t0"] >= end:
                total += s["t1"] - s["t0"]
                end = s["t1"]
            elif s["t1"] > end:
                total += s["t1"] - end
                end = s["t1"]
        return total

    def count(self, name: str) -> int:
        return sum(p["calls"].get(name, [0, 0.0])[0] for p in self.probes)

    def calls(self, prefix: str) -> tuple[int, float]:
        n, t = 0, 0.0
        for p in self.probes:
            for key, (cn, ct) in p["calls"].items():
                if key.startswith(prefix):
                    n, t = n + cn, t + ct
        return n, t

    def category(self, cat: str) -> float:
        return sum(p["cats"].get(cat, 0.0) for p in self.probes)

    def steps(self) -> list[tuple[float, int]]:
        out = [(t, s) for p in self.probes for t, s in p["steps"]]
        return sorted(out)

    def first_step_at(self) -> float | None:
        """Seconds from spawn to the end of the first optimizer step."""
        steps = self.steps()
        return steps[0][0] - self.t_spawn if steps else None


class ProbeTargetMissing(RuntimeError):
    """A function the timing probe wraps no longer exists (renamed by a library upgrade)."""


def run_probed(label: str, command: Sequence[str], env: dict[str, str], *, cwd: Path | None = None,
               timeout: float = 1800, check: bool = True) -> Proc:  # fmt: skip
    """Run a command with the probe on; collect its probe files (and its children's).

    `cpu` is the CPU time (user + system) of the process and every descendant it waited for
    (the Prefect temporary server included): less sensitive than wall time to other load.
    """
    probe_dir = Path(tempfile.mkdtemp(prefix="ckptflow-probe-"))
    env = {**env, "CKPTFLOW_BENCH_PROBE": str(probe_dir)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(list(command), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    t1 = time.monotonic()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    probes = []
    for f in sorted(probe_dir.glob("probe-*.json")):
        try:
            probes.append(json.loads(f.read_text()))
        except ValueError:
            pass
    shutil.rmtree(probe_dir, ignore_errors=True)
    broken = sorted({m for p in probes for m in p.get("missing", []) + p.get("probe_errors", [])})
    if broken:  # time would silently move to another bucket: refuse to report it
        raise ProbeTargetMissing(f"{label}: the timing probe could not wrap {', '.join(broken)}; update benchmarks/_probe")
    result = Proc(label, t1 - t0, proc.returncode, t0, t1, probes, proc.stderr[-4000:], proc.stdout, cpu)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{label}: {' '.join(command)} exited {proc.returncode}\n{proc.stderr[-4000:]}")
    return result


def step_intervals(proc: Proc) -> list[float]:
    """Seconds between consecutive optimizer steps that had no evaluation, save or chunk boundary between them."""
    busy = [(s["t0"], s["t1"]) for s in proc.spans() if s["n"] in ("hf.eval", "hf.save", "cb.on_save", "hf.train")]
    steps = proc.steps()
    out = []
    for (ta, sa), (tb, sb) in zip(steps, steps[1:]):
        if sb != sa + 1:
            continue
        if any(ta < t < tb for lo, hi in busy for t in (lo, hi)):
            continue
        out.append(tb - ta)
    return out


# -- where the time went ------------------------------------------------------------------
# Buckets of the breakdown, in print order: key -> (label, kind). Kinds: "fixed" (once per
# process or run), "chunk" (once per chunk), "save" (per checkpoint), "step" (per step).
BUCKETS: dict[str, tuple[str, str]] = {
    "process": ("process start, CLI glue", "fixed"),
    "exit": ("interpreter shutdown after atexit", "fixed"),
    "imports": ("imports", "fixed"),
    "worker_imports": ("imports in chunk child processes", "chunk"),
    "prefect_server": ("Prefect temporary server start/stop", "fixed"),
    "prefect_engine": ("Prefect flow/task engine (API calls, states)", "chunk"),
    "bookkeeping": ("open run / set status (ledger)", "fixed"),
    "data": ("data + tokenizer load", "chunk"),
    "model": ("model load + trainer build", "chunk"),
    "reconcile": ("reconcile + resume selection", "chunk"),
    "verify": ("resume verification (re-hash)", "chunk"),
    "resume": ("resume: load checkpoint state", "chunk"),
    "worker": ("worker process start/exit", "chunk"),
    "chunk_glue": ("chunk/attempt glue (+ child spawn/exit)", "chunk"),
    "steps": ("training steps (incl. per-step callbacks)", "step"),
    "eval": ("evaluation during training", "step"),
    "save": ("checkpoint write (HF save + rotation)", "save"),
    "manifest": ("manifest: hash + fsync", "save"),
    "retention": ("retention decision + prune", "save"),
    "ledger": ("ledger calls (other)", "save"),
    "commit_glue": ("commit callback glue", "save"),
    "end_of_run": ("end of run: evaluate, export, artifacts", "fixed"),
}
_NAME_BUCKET = {
    "process.main": "process",
    "process.worker": "worker",
    "prefect.server_start": "prefect_server",
    "prefect.server_stop": "prefect_server",
    "pipeline.prepare": "data",
    "pipeline.load_inputs": "data",
    "data.prepare_data": "data",
    "modeling.resolve_model": "data",
    "modeling.load_tokenizer": "data",
    "hf.tokenizer_from_pretrained": "data",
    "pipeline.open_or_create_run": "bookkeeping",
    "pipeline.set_status": "bookkeeping",
    "chunks.run_chunk": "chunk_glue",
    "chunks.train_attempt": "chunk_glue",
    "chunks.end_attempt": "chunk_glue",
    "chunks.begin_attempt": "reconcile",
    "recovery.reconcile": "reconcile",
    "recovery.resume_point": "reconcile",
    "integrity.verify_checkpoint": "verify",
    "modeling.load_base_model": "model",
    "hf.model_from_pretrained": "model",
    "trainer.init": "model",
    "hf.resume_model": "resume",
    "hf.resume_optim": "resume",
    "hf.resume_rng": "resume",
    "hf.train": "steps",
    "hf.eval": "eval",
    "hf.save": "save",
    "cb.on_save": "commit_glue",
    "integrity.write_manifest": "manifest",
    "retention.apply_retention": "retention",
    "views.runs_view": "bookkeeping",
    "views.checkpoints_view": "bookkeeping",
}
# Spans whose whole subtree is end-of-run work (evaluate, export, artifacts).
_END_OF_RUN = ("pipeline.evaluate_run", "pipeline.export_run", "task:evaluate", "task:export_best",
               "task:publish_artifacts", "task:publish_run_artifacts")  # fmt: skip


def _bucket_of(name: str) -> str:
    if name.startswith(("flow:", "task:")):
        return "prefect_engine"
    return _NAME_BUCKET.get(name, "chunk_glue" if name.startswith("chunks.") else "process")


def breakdown(proc: Proc, until: float | None = None) -> dict[str, float]:
    """Exclusive seconds per bucket; they add up to the wall time (or to `until` − spawn).

    The spans of all probed processes form one tree by time containment (a worker process
    sits inside the parent's chunk span). Each span's own time — minus its children, minus
    the imports and ledger calls made directly in it — goes to its bucket; imports and ledger
    calls go to theirs. Anything under evaluate/export/artifacts goes to end_of_run.
    `until` (monotonic) cuts the timeline there, e.g. at the first optimizer step.
    """
    end = proc.t_end if until is None else until
    nodes, events = [], []
    for p in proc.probes:
        is_main = p is proc.main
        t0, t1 = (proc.t_spawn, end) if is_main else (p["t_site"], min(p.get("t_exit", p["t_site"]), end))
        root = {"n": "process.main" if is_main else "process.worker", "t0": t0, "t1": t1, "pid": p["pid"]}
        nodes.append(root)
        nodes += [{"n": s["n"], "t0": s["t0"], "t1": min(s["t1"], end), "pid": p["pid"]}
                  for s in p["spans"] if s["t1"] is not None and s["t0"] < end]  # fmt: skip
        events += [(cat, p["pid"], a, min(b, end)) for cat, _name, a, b in p.get("events", [])
                   if a < end and cat in ("imports", "ledger")]  # fmt: skip
    nodes = [n for n in nodes if n["t0"] < end]
    nodes.sort(key=lambda s: (s["t0"], -s["t1"]))
    stack: list[dict] = []
    for n in nodes:
        n["kids"], n["own"] = [], {"imports": 0.0, "ledger": 0.0}
        while stack and not (n["t0"] >= stack[-1]["t0"] and n["t1"] <= stack[-1]["t1"] + 1e-3):
            stack.pop()
        n["end"] = bool(stack and stack[-1]["end"]) or n["n"] in _END_OF_RUN
        if stack:
            stack[-1]["kids"].append(n)
        stack.append(n)
    roots = {n["pid"]: n for n in nodes if n["n"].startswith("process.")}
    for cat, pid, a, b in events:
        node = roots.get(pid)
        while node is not None:  # descend to the innermost span of that process holding the event
            inner = next((k for k in node["kids"] if k["pid"] == pid and k["t0"] <= a and b <= k["t1"] + 1e-4), None)
            if inner is None:
                break
            node = inner
        if node is not None:
            node["own"][cat] += b - a
    out = dict.fromkeys(BUCKETS, 0.0)
    main_exit = proc.main.get("t_exit")
    if main_exit is not None and main_exit < end:  # after our atexit hook (the last one): finalization
        out["exit"] = end - main_exit
        roots[proc.main["pid"]]["t1"] = main_exit
    for n in nodes:
        self_time = (n["t1"] - n["t0"]) - sum(k["t1"] - k["t0"] for k in n["kids"]) - sum(n["own"].values())
        bucket = "end_of_run" if n["end"] else _bucket_of(n["n"])
        out[bucket] += max(0.0, self_time)
        out["imports" if n["pid"] == proc.main["pid"] else "worker_imports"] += n["own"]["imports"]
        out["end_of_run" if n["end"] else "ledger"] += n["own"]["ledger"]
    return out


def timed(fn, *args: Any, repeat: int = 1, **kwargs: Any) -> tuple[float, Any]:
    """(median seconds over `repeat` calls, last result)."""
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


# -- machine and load -------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    versions = {}
    for mod in ("torch", "transformers", "trl", "peft", "prefect", "sqlalchemy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing package is just not reported
            versions[mod] = None
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "versions": versions,
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- tables and results ------------------------------------------------------------------------
def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}f}"
    return str(value)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "—"
    return f"{a / b:.2f}×"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


@dataclass
class Report:
    """Tables and notes of one benchmark; printed and saved together with the raw numbers."""

    name: str
    title: str
    quick: bool
    sections: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    load_start: list[float] = field(default_factory=loadavg)

    def table(self, caption: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        text = f"**{caption}**\n\n{md_table(headers, rows)}"
        self.sections.append(text)
        print("\n" + text, flush=True)

    def note(self, text: str) -> None:
        self.sections.append(text)
        print("\n" + text, flush=True)

    def save(self) -> Path:
        load_end = loadavg()
        header = f"### {self.title}{' (quick mode: numbers mean little)' if self.quick else ''}"
        footer = f"_load average (1/5/15 min) at start {self.load_start}, at end {load_end}_"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        md = "\n\n".join([header, *self.sections, footer]) + "\n"
        (RESULTS_DIR / f"{self.name}.md").write_text(md)
        doc = {
            "name": self.name,
            "quick": self.quick,
            "machine": machine(),
            "loadavg_start": self.load_start,
            "loadavg_end": load_end,
            "data": self.data,
        }
        path = RESULTS_DIR / f"{self.name}.json"
        path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
        print(f"\n{footer}\nresults: {path}", flush=True)
        return path
