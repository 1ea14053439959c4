"""Benchmark 8 — answers that need no server: CLI processes timed against `ckptflow --help`.

A home with one completed run (`done`, the tutorial defaults) is made first, untimed. Then each
command runs as a fresh process, several times (median wall and CPU seconds): `--help` (the
floor: interpreter, typer, settings), `run` of the completed run, two refused inputs (a bad run
name, a bad setting), `plan`, `runs`, `checkpoints done`, `verify done`. Each row also says
whether the process imported torch or Prefect (`-X importtime`). Target (issue 13): the
completed run and a refused input ≤ 1.5× `--help`.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RUN = "done"
# label -> (CLI arguments, extra environment, expected exit code)
COMMANDS: dict[str, tuple[list[str], dict[str, str], int]] = {
    "ckptflow --help": (["--help"], {}, 0),
    f"ckptflow run --run-name {RUN} (completed)": (["run", "--run-name", RUN], {}, 0),
    "ckptflow run --run-name bad..name (refused)": (["run", "--run-name", "bad..name"], {}, 2),
    "ckptflow run, CKPTFLOW_TRAIN__LAUNCHER=bogus (refused)": (["run"], {"CKPTFLOW_TRAIN__LAUNCHER": "bogus"}, 2),
    "ckptflow plan": (["plan"], {}, 0),
    "ckptflow runs": (["runs"], {}, 0),
    f"ckptflow checkpoints {RUN}": (["checkpoints", RUN], {}, 0),
    f"ckptflow verify {RUN}": (["verify", RUN], {}, 0),
}
# Top-level modules whose import the table reports (the expensive ones an answer should not need).
HEAVY = ("torch", "prefect")


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    """base_env without the timing probe on PYTHONPATH: these processes are timed from outside only."""
    env = C.base_env(home, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(C.TREE / "src"), str(C.TREE)])
    return env


def make_completed_run(work: Path, home: Path) -> None:
    """`ckptflow run --run-name done` at the tutorial defaults (4 steps; a temporary Prefect server), untimed."""
    prefect_home = work / "prefect-home"
    C.warm_prefect_home(prefect_home)
    # A busy machine: give the temporary server longer than Prefect's default to come up.
    env = cli_env(home, PREFECT_HOME=str(prefect_home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    proc = subprocess.run([C.PYTHON, "-m", "ckptflow.cli", "run", "--run-name", RUN], env=env, cwd=work,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"setting up the completed run failed: {proc.stderr[-3000:]}")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_command(work: Path, home: Path, args: list[str], extra: dict[str, str], code: int, repeat: int) -> dict:
    walls, cpus = [], []
    env = cli_env(home, **extra)
    for _ in range(repeat):
        cpu0, t0 = _children_cpu(), time.perf_counter()
        proc = subprocess.run([C.PYTHON, "-m", "ckptflow.cli", *args], env=env, cwd=work, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        cpus.append(_children_cpu() - cpu0)
        if proc.returncode != code:
            raise RuntimeError(f"ckptflow {' '.join(args)} exited {proc.returncode}, expected {code}: {proc.stderr[-2000:]}")
    traced = subprocess.run([C.PYTHON, "-X", "importtime", "-m", "ckptflow.cli", *args], env=env, cwd=work,
                            capture_output=True, text=True)  # fmt: skip
    imported = sorted({line.rsplit("|", 1)[-1].strip() for line in traced.stderr.splitlines()
                       if line.startswith("import time:")} & set(HEAVY))  # fmt: skip
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "walls": walls, "imports": imported}


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    report = C.Report("cli", "8. Answers without a server: CLI processes against `ckptflow --help`", args.quick)
    repeat = 1 if args.quick else 7
    with C.Workdir(args, "cli") as work:
        home = work / "home"
        print("[cli] making a completed run (untimed) ...", flush=True)
        make_completed_run(work, home)
        results = {}
        for label, (cli_args, extra, code) in COMMANDS.items():
            results[label] = time_command(work, home, cli_args, extra, code, repeat)
            print(f"[cli] {label}: {results[label]['wall']:.2f}s", flush=True)
    floor = results["ckptflow --help"]
    report.data["commands"] = results
    report.table(
        f"CLI processes (seconds, median of {repeat}; ratios against `ckptflow --help`)",
        ["command", "wall s", "wall ratio", "CPU s", "CPU ratio", "imports torch / Prefect"],
        [[label, r["wall"], C.ratio(r["wall"], floor["wall"]), r["cpu"], C.ratio(r["cpu"], floor["cpu"]),
          ", ".join(r["imports"]) or "neither"] for label, r in results.items()],
    )  # fmt: skip
    report.note(
        "- target (issue 13): `run` of a completed run and a refused input ≤ 1.5× `--help`; none of these "
        "commands starts Prefect. `plan` imports torch: it counts the LoRA parameters of the real model. "
        "CPU ratios are the steadier ones on a busy machine."
    )
    report.save()


if __name__ == "__main__":
    main()
