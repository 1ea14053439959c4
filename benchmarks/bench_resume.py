"""Benchmark 2 — resume latency: process start → first resumed optimizer step.

Setup: a ckptflow run (200 steps, save every 50, one chunk) is SIGKILLed at step 120
(ckptflow's own fault injection), so checkpoint-100 is the newest committed one; the bare
script trains to step 100 and stops. Then, each repeated, every process stops right after
its first resumed step (step 101):

- bare: `trainer.train(resume_from_checkpoint=".../checkpoint-100")` (the baseline);
- ckptflow library: the finetune steps without Prefect — prepare, open run, reconcile,
  resume_point (re-hashes checkpoint-100 against its manifest and the ledger), train;
- `ckptflow run`, with a temporary Prefect server and with a running one.

ckptflow's processes stop via fault injection (`raise` at step 101, no retries), so every
repeat resumes from the same checkpoint. Each latency is split into exclusive buckets up to
the first resumed step.

Then the cost of one more chunk (a planned resume inside a run, issue 13): for each launcher,
the same run (same steps, same saves) as one chunk and as many chunks; per extra chunk =
wall difference / extra chunks, against the targets ≤ 0.15 s in-process and ≤ 0.6 s with
launcher=subprocess.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DRIVER = C.BENCH_DIR / "_drive.py"
RUN = "resume"
# Issue 13's targets: seconds one more chunk may add to a run, by launcher.
CHUNK_TARGETS = {"inprocess": 0.15, "subprocess": 0.6}


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    quick = args.quick
    total, save, crash_at = (8, 2, 5) if quick else (200, 50, 120)
    resume_step = (crash_at // save) * save
    repeat = 1 if quick else 2
    report = C.Report("resume", "2. Resume latency: start → first resumed optimizer step", quick)
    with C.Workdir(args, "resume") as work:
        home, model, data = C.prepare_workload(work)
        prefect_home = work / "prefect-home"
        if not quick:
            C.warm_prefect_home(prefect_home)
        common = dict(total_steps=total, save_steps=save, chunk_steps=total, prefect_home=prefect_home)
        # 1. the crash, and the bare script's checkpoint at the same step
        crash = C.run_probed("crash", [C.PYTHON, str(DRIVER), RUN], C.ckptflow_env(
            home, **common, CKPTFLOW_FAULT__AT_STEP=str(crash_at), CKPTFLOW_FAULT__MODE="kill"), cwd=work, check=False)
        assert crash.returncode == -9, f"expected SIGKILL at step {crash_at}, got {crash.returncode}: {crash.stderr_tail}"
        bare_out = work / "bare"
        C.run_probed("bare-train", C.bare_args(model, data, bare_out, total_steps=total, save_steps=save)
                     + ["--stop-after", str(resume_step)], C.base_env(home), cwd=work)  # fmt: skip
        # 2. resumes, each stopping after its first resumed step
        stop = dict(CKPTFLOW_FAULT__AT_STEP=str(resume_step + 1), CKPTFLOW_FAULT__MODE="raise",
                    CKPTFLOW_FAULT__TIMES="1000", CKPTFLOW_TRAIN__RETRIES="0")  # fmt: skip
        server: C.PrefectServer | None = None
        variants = {  # label -> (command and environment, needs the running server)
            "bare: trainer.train(resume_from_checkpoint=path)": (lambda: (
                C.bare_args(model, data, bare_out, total_steps=total, save_steps=save)
                + ["--resume-from", str(bare_out / f"checkpoint-{resume_step}"), "--stop-after", "1"],
                C.base_env(home),
            ), False),
            "ckptflow library (no Prefect)": (lambda: (
                [C.PYTHON, str(DRIVER), RUN], C.ckptflow_env(home, **common, **stop)), False),
        }  # fmt: skip
        if not quick:  # the CLI variants (--quick covers the CLI in bench_overhead)
            variants["ckptflow run, temporary Prefect server"] = (lambda: (
                [C.CKPTFLOW, "run", "--run-name", RUN], C.ckptflow_env(home, **common, **stop)), False)
            variants["ckptflow run, running Prefect server"] = (lambda: (
                [C.CKPTFLOW, "run", "--run-name", RUN],
                C.ckptflow_env(home, **common, **stop, PREFECT_API_URL=server.url)), True)  # fmt: skip
        results: dict[str, list[dict]] = {}
        try:
            for label, (make, needs_server) in variants.items():
                if needs_server and server is None:  # started only now: an idle server still uses some CPU
                    server = C.PrefectServer(prefect_home, work / "prefect-server.log").__enter__()
                for i in range(repeat):
                    cmd, env = make()
                    print(f"[resume] {label} #{i + 1} ...", flush=True)
                    p = C.run_probed(label, cmd, env, cwd=work, check=False)
                    results.setdefault(label, []).append(measure(p, resume_step))
        finally:
            if server is not None:
                server.__exit__(None, None, None)
        chunk_runs = measure_chunks(work, home, quick)
    print_tables(report, results, resume_step)
    print_chunk_table(report, chunk_runs)
    report.data.update(total_steps=total, save_steps=save, crash_at=crash_at, resume_step=resume_step, runs=results,
                       chunk_runs=chunk_runs)  # fmt: skip
    report.save()


def measure_chunks(work: Path, home: Path, quick: bool) -> dict[str, dict]:
    """Per launcher: one run as 1 chunk and as N chunks (same steps and saves), each repeated; no Prefect.

    Three estimates of what one more chunk costs: the wall difference / extra chunks (the
    definition; on a busy machine other processes' load and the steps' own noise swamp it);
    the CPU-time difference / extra chunks (one torch thread, so CPU time is what the work
    costs, whatever else runs); and the pause at each chunk boundary — end of step k·C to end
    of step k·C + 1, which holds that step, its save and eval, and (split run only) the chunk
    restart — minus the same pause in the one-chunk run.
    """
    total, save = (4, 2) if quick else (48, 6)  # quick: 1 chunk vs 2 (each child re-imports torch)
    repeat = 1 if quick else 3
    boundaries = list(range(save, total, save))
    out: dict[str, dict] = {}
    for launcher in CHUNK_TARGETS:
        walls: dict[int, list[float]] = {}
        cpus: dict[int, list[float]] = {}
        pauses: dict[int, list[float]] = {}
        for i in range(repeat):
            for chunk_steps in (total, save):  # interleaved: load drifts affect both alike
                name = f"chunks-{launcher}-{chunk_steps}-{i}"
                env = C.ckptflow_env(home, total_steps=total, save_steps=save, chunk_steps=chunk_steps,
                                     launcher=launcher, OMP_NUM_THREADS="1")  # fmt: skip
                print(f"[resume] {launcher}, chunk_steps={chunk_steps} #{i + 1} ...", flush=True)
                p = C.run_probed(name, [C.PYTHON, str(DRIVER), name], env, cwd=work)
                chunks = total // chunk_steps
                walls.setdefault(chunks, []).append(p.wall)
                cpus.setdefault(chunks, []).append(p.cpu)
                pauses.setdefault(chunks, []).extend(_boundary_pauses(p, boundaries))
        one, many = min(walls), max(walls)
        extra = many - one
        out[launcher] = {
            "total_steps": total, "save_steps": save, "chunks": many, "walls": walls, "cpus": cpus, "pauses": pauses,
            "per_extra_chunk_wall": (statistics.median(walls[many]) - statistics.median(walls[one])) / extra,
            "per_extra_chunk_cpu": (statistics.median(cpus[many]) - statistics.median(cpus[one])) / extra,
            "per_extra_chunk_pause": statistics.median(pauses[many]) - statistics.median(pauses[one]),
            "target": CHUNK_TARGETS[launcher],
        }  # fmt: skip
    return out


def _boundary_pauses(p: C.Proc, boundaries: list[int]) -> list[float]:
    """Seconds from the end of step b to the end of step b + 1, for each chunk boundary b."""
    at = {step: t for t, step in p.steps()}
    missing = [b for b in boundaries if b not in at or b + 1 not in at]
    if missing:
        raise RuntimeError(f"{p.label}: no step timestamps around steps {missing}")
    return [at[b + 1] - at[b] for b in boundaries]


def print_chunk_table(report: C.Report, chunk_runs: dict[str, dict]) -> None:
    rows = []
    for launcher, r in chunk_runs.items():
        one, many, target = min(r["walls"]), max(r["walls"]), r["target"]
        estimates = [r["per_extra_chunk_wall"], r["per_extra_chunk_cpu"], r["per_extra_chunk_pause"]]
        rows.append([launcher, statistics.median(r["walls"][one]), statistics.median(r["walls"][many]), *estimates,
                     f"≤ {target:.2f}", " / ".join(C.ratio(e, target) for e in estimates),
                     " / ".join("yes" if e <= target else "NO" for e in estimates)])  # fmt: skip
    first = next(iter(chunk_runs.values()))
    report.table(
        f"Per extra chunk, seconds ({first['total_steps']} steps, save every {first['save_steps']}, 1 chunk vs "
        f"{first['chunks']}; library, no Prefect, one torch thread; median of {len(first['walls'][1])} runs)",
        ["launcher", "1 chunk wall", f"{first['chunks']} chunks wall", "per extra chunk: wall", "CPU", "boundary pause",
         "target", "ratio to target (wall / CPU / pause)", "within"],
        rows,
    )  # fmt: skip
    report.note("- per extra chunk: wall = wall difference / extra chunks (issue 13's definition); CPU = the same with "
                "CPU time of the process and its children (robust to other load); boundary pause = median pause from "
                "the end of a chunk's last step to the end of the next step, minus the same step's pause in the "
                "one-chunk run.")


def measure(p: C.Proc, resume_step: int) -> dict:
    """Latency to the first resumed step and its breakdown (up to that instant)."""
    steps = [(t, s) for t, s in p.steps() if s == resume_step + 1]
    if not steps:
        raise RuntimeError(f"{p.label}: no step {resume_step + 1} reached (exit {p.returncode}):\n{p.stderr_tail}")
    t_first = steps[0][0]
    parts = C.breakdown(p, until=t_first)
    verified = [s for s in p.spans("integrity.verify_checkpoint") if s["t0"] < t_first]
    return {"latency": t_first - p.t_spawn, "breakdown": parts, "wall": p.wall, "verifications": len(verified)}


def print_tables(report: C.Report, results: dict[str, list[dict]], resume_step: int) -> None:
    labels = list(results)
    base = statistics.median(r["latency"] for r in results[labels[0]])
    report.table(
        f"Start → first resumed step (step {resume_step + 1}), seconds, median of {len(results[labels[0]])}",
        ["variant", "latency", "ratio to bare", "checkpoints verified"],
        [[label, statistics.median(r["latency"] for r in rs), C.ratio(statistics.median(r["latency"] for r in rs), base),
          rs[0]["verifications"]] for label, rs in results.items()],
    )  # fmt: skip
    short = {labels[0]: "bare", **{lab: lab.replace("ckptflow ", "").split(",")[-1].strip() for lab in labels[1:]}}
    rows = []
    for bucket, (label, _kind) in C.BUCKETS.items():
        vals = [statistics.median(r["breakdown"][bucket] for r in results[lab]) for lab in labels]
        if max(vals) >= 0.005:
            rows.append([label, *vals])
    report.table("Where the resume latency went, seconds (median; exclusive buckets up to the first resumed step)",
                 ["bucket", *[short[lab] for lab in labels]], rows)  # fmt: skip


if __name__ == "__main__":
    main()
