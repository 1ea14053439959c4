"""Benchmark 1 — orchestration overhead: the same fine-tune, bare vs `ckptflow run`.

Variants (each a real process; wall time from this parent, spans from the probe):

  a        bare TRL SFTTrainer script at TRL's defaults, HF checkpointing (save_steps,
           save_total_limit)                                                           [baseline]
  b        `ckptflow run`, in-process launcher, Prefect temporary server (no PREFECT_API_URL)
  b-srv    the same against an already running `prefect server start` on 127.0.0.1 (b-long-srv: the long run)
  c        launcher=subprocess (each chunk trains in a child process), running server
  d-N      chunk_steps=N, running server (N = total: one chunk; N = save_steps: many chunks)
  *-fp32   the bare script and ckptflow both pinned to fp32 (a matched precision other than the default)
  a-pf     the bare script as a Prefect flow with as many task runs as `b-srv`, running server: what Prefect
           alone costs a TRL script (b-srv / a-pf is what ckptflow adds beyond it)

Every run's precision is read back from the run itself (the bare script prints it; ckptflow's
ledger records it), and every ckptflow run gets two ratios: against the bare script at TRL's
defaults (what a user compares with) and against the bare script at the same precision.

The long runs (a-long, b-long-srv, b-long: a few minutes of training each) give the headline
ratios; the other variants run a shorter workload against their own bare baseline `a`. Two runs
of the same command differ by up to ~10% in step time on this machine (per process: the same
settings, the same steps), so the headline pairs run more than once, interleaved (a, b, a, b, ...),
and each reports the run of median wall time, with every run's wall beside it. Every ckptflow run is
split into exclusive buckets (imports, Prefect startup, per-chunk model reload, manifest
hashing, ledger calls, ...) that add up to its wall time.
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


@dataclass(frozen=True)
class Variant:
    key: str
    what: str
    kind: str  # "bare" or "ckptflow"
    total_steps: int
    save_steps: int
    chunk_steps: int = 0  # 0 = ckptflow's auto (about 4 chunks)
    launcher: str = "inprocess"
    server: str = "temp"  # "temp" (temporary server) or "running"
    baseline: str = "a"  # the bare run at TRL's defaults of the same length
    precision: str = "default"  # default (TRL's / ckptflow's auto) or pinned: fp32, bf16, fp16
    prefect_tasks: int = 0  # bare only: N > 0 runs the bare script as a Prefect flow of N task runs
    repeat: int = 1  # runs of this variant, interleaved with the other repeated variants of its group


def variants(quick: bool) -> list[Variant]:
    if quick:
        t, s = 4, 2
        return [
            Variant("a", "bare SFTTrainer + HF checkpointing", "bare", t, s),
            Variant("b", "ckptflow run, temporary Prefect server", "ckptflow", t, s),
            Variant("a-fp32", "bare SFTTrainer, pinned fp32", "bare", t, s, precision="fp32"),
            Variant("b-fp32", "ckptflow run pinned fp32, temporary server", "ckptflow", t, s, precision="fp32"),
            Variant("a-pf", "bare SFTTrainer as a Prefect flow of 3 task runs, temporary server", "bare", t, s,
                    prefect_tasks=3),  # fmt: skip
        ]
    long_t, long_s = 4000, 100
    t, s = 400, 50
    return [
        Variant("a-long", "bare SFTTrainer + HF checkpointing", "bare", long_t, long_s, baseline="a-long", repeat=3),
        Variant("b-long-srv", "ckptflow run, running Prefect server", "ckptflow", long_t, long_s, server="running",
                baseline="a-long", repeat=3),  # fmt: skip
        Variant("b-long", "ckptflow run, temporary Prefect server", "ckptflow", long_t, long_s, baseline="a-long"),
        Variant("a", "bare SFTTrainer + HF checkpointing", "bare", t, s, repeat=5),
        Variant("b", "ckptflow run, temporary Prefect server", "ckptflow", t, s),
        Variant("b-srv", "ckptflow run, running Prefect server", "ckptflow", t, s, server="running", repeat=5),
        Variant("a-pf", f"bare SFTTrainer as a Prefect flow of {PREFECT_TASK_RUNS} task runs, running server", "bare", t, s,
                server="running", prefect_tasks=PREFECT_TASK_RUNS, repeat=5),  # fmt: skip
        Variant("a-fp32", "bare SFTTrainer, pinned fp32", "bare", t, s, precision="fp32"),
        Variant("b-srv-fp32", "ckptflow run pinned fp32, running server", "ckptflow", t, s, server="running",
                precision="fp32"),  # fmt: skip
        Variant("c", "launcher=subprocess, running server", "ckptflow", t, s, launcher="subprocess", server="running"),
        Variant(f"d-{t}", "one chunk (chunk_steps=total), running server", "ckptflow", t, s, chunk_steps=t, server="running",
                repeat=3),  # fmt: skip
        Variant(f"d-{s}", f"{t // s} chunks (chunk_steps={s}), running server", "ckptflow", t, s, chunk_steps=s,
                server="running", repeat=3),  # fmt: skip
    ]


# Task runs of a 400-step `ckptflow run` (prepare_data, open_run, 4 train_chunk, evaluate, export_best,
# publish_artifacts): the Prefect-only baseline `a-pf` makes as many.
PREFECT_TASK_RUNS = 9


def run_order(todo: list[Variant]) -> list[tuple[Variant, int]]:
    """(variant, round) in run order: within a baseline group the repeated variants first, interleaved
    round by round (a slow drift of the machine falls on both sides alike), then the others once."""
    order = []
    for group in _groups(todo):
        repeated = [v for v in group if v.repeat > 1]
        for r in range(max((v.repeat for v in repeated), default=0)):
            order += [(v, r) for v in repeated if r < v.repeat]
        order += [(v, 0) for v in group if v.repeat == 1]
    return order


def run_name(v: Variant, round_: int) -> str:
    return f"bench-{v.key}" + (f"-{round_ + 1}" if round_ else "")


def run_variant(v: Variant, round_: int, work: Path, home: Path, model: Path, data: Path, prefect_home: Path,
                server: C.PrefectServer | None) -> C.Proc:  # fmt: skip
    if v.kind == "bare":
        out = work / run_name(v, round_).replace("bench-", "bare-")
        args = C.bare_args(model, data, out, total_steps=v.total_steps, save_steps=v.save_steps, precision=v.precision)
        if v.prefect_tasks:
            args += ["--prefect-tasks", str(v.prefect_tasks)]
        api = {"PREFECT_API_URL": server.url} if v.server == "running" and server else {}
        return C.run_probed(v.key, args, C.base_env(home, prefect_home=prefect_home, **api), cwd=work)
    extra = {"PREFECT_API_URL": server.url} if v.server == "running" and server else {}
    extra.update(PRECISION_ENV[v.precision])
    env = C.ckptflow_env(home, total_steps=v.total_steps, save_steps=v.save_steps, chunk_steps=v.chunk_steps,
                         launcher=v.launcher, prefect_home=prefect_home, **extra)  # fmt: skip
    return C.run_probed(v.key, [C.CKPTFLOW, "run", "--run-name", run_name(v, round_)], env, cwd=work)


# A pinned precision as ckptflow settings (`default` leaves both switches at auto).
PRECISION_ENV = {
    "default": {},
    "fp32": {"CKPTFLOW_TRAIN__BF16": "false", "CKPTFLOW_TRAIN__FP16": "false"},
    "bf16": {"CKPTFLOW_TRAIN__BF16": "true"},
    "fp16": {"CKPTFLOW_TRAIN__FP16": "true"},
}


def trained_precision(v: Variant, round_: int, p: C.Proc, home: Path) -> str:
    """The precision the run really trained in: the bare script prints it, ckptflow's ledger records it."""
    if v.kind == "bare":
        return next(line.split(":", 1)[1].strip() for line in p.stdout.splitlines() if line.startswith("precision:"))
    with sqlite3.connect(home / "ledger.db") as db:
        (config,) = db.execute("SELECT config FROM runs WHERE name = ?", (run_name(v, round_),)).fetchone()
    train = json.loads(config)["settings"]["train"]
    return "bf16" if train.get("bf16") is True else "fp16" if train.get("fp16") is True else "fp32"


def fixed_seconds(parts: dict[str, float]) -> float:
    return sum(sec for key, sec in parts.items() if C.BUCKETS[key][1] == "fixed")


def per_train_call(p: C.Proc) -> list[dict]:
    """For each trainer.train() (one per chunk): seconds to its first step, and its step times (ms)."""
    out = []
    steps = p.steps()
    for span in p.spans("hf.train"):
        inside = [t for t, _ in steps if span["t0"] <= t <= span["t1"]]
        gaps = [b - a for a, b in zip(inside, inside[1:])]
        out.append({
            "seconds": span["t1"] - span["t0"],
            "first_step_after": inside[0] - span["t0"] if inside else None,
            "steps": len(inside),
            "mean_ms": statistics.mean(gaps) * 1e3 if gaps else None,
            "median_ms": statistics.median(gaps) * 1e3 if gaps else None,
            "p99_ms": sorted(gaps)[int(len(gaps) * 0.99)] * 1e3 if gaps else None,
        })  # fmt: skip
    return out


def summarize(v: Variant, round_: int, p: C.Proc, home: Path) -> dict:
    parts = C.breakdown(p)
    steps = C.step_intervals(p)
    return {
        "precision": trained_precision(v, round_, p, home),
        "train_calls": per_train_call(p),
        "variant": v.__dict__,
        "chunks": p.count("chunks.run_chunk") or 1,
        "wall": p.wall,
        "cpu": p.cpu,
        "first_step_at": p.first_step_at(),
        "fixed": fixed_seconds(parts),
        "breakdown": parts,
        "step_median_ms": statistics.median(steps) * 1000 if steps else None,
        "steps_timed": len(steps),
        "prefect_server_start": max((s["t1"] - s["t0"] for s in p.spans("prefect.server_start")), default=0.0),
        "prefect_server_stop": max((s["t1"] - s["t0"] for s in p.spans("prefect.server_stop")), default=0.0),
        "saves": p.count("hf.save"),
        "ledger_calls": p.calls("ledger.")[0],
        "load": C.loadavg()[0],
    }


def median_run(done: list[dict]) -> dict:
    """The run of median wall time (of an even count, the faster middle one), with every run's wall."""
    walls = [r["wall"] for r in done]
    chosen = next(r for r in done if r["wall"] == statistics.median_low(walls))
    return {**chosen, "walls": walls}


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    report = C.Report("overhead", "1. Orchestration overhead: bare SFTTrainer vs `ckptflow run`", args.quick)
    todo = variants(args.quick)
    runs: dict[str, list[dict]] = {}
    with C.Workdir(args, "overhead") as work:
        home, model, data = C.prepare_workload(work)
        prefect_home = work / "prefect-home"
        report.data["prefect_db_init_seconds"] = C.warm_prefect_home(prefect_home)
        server = None
        server_ctx = None
        # Started before the first run, so every run (bare ones too) sees the same machine: the running-server
        # variants then measure what ckptflow's use of the server costs, not a server idling on the same cores.
        if any(v.server == "running" for v in todo):
            server_ctx = C.PrefectServer(prefect_home, work / "prefect-server.log")
            server = server_ctx.__enter__()
            report.data["running_server_startup_seconds"] = server.startup_seconds
        for v, round_ in run_order(todo):
            label = f"{v.key} (run {round_ + 1} of {v.repeat})" if v.repeat > 1 else v.key
            print(f"[overhead] {label}: {v.what} ({v.total_steps} steps, save every {v.save_steps}) ...", flush=True)
            p = run_variant(v, round_, work, home, model, data, prefect_home, server)
            runs.setdefault(v.key, []).append(summarize(v, round_, p, home))
            print(f"[overhead] {label}: wall {p.wall:.1f}s, cpu {p.cpu:.1f}s, {runs[v.key][-1]['precision']}", flush=True)
        if server_ctx is not None:
            server_ctx.__exit__(None, None, None)
    results = {key: median_run(done) for key, done in runs.items()}
    report.data["runs"] = results
    print_tables(report, todo, results)
    report.save()


def print_tables(report: C.Report, todo: list[Variant], results: dict[str, dict]) -> None:
    rows = []
    for v in todo:
        r, base = results[v.key], results[v.baseline]
        var_r = (r["wall"] - r["fixed"]) / (base["wall"] - base["fixed"]) if base["wall"] > base["fixed"] else None
        matched = _matched_bare(v, todo, results)
        rows.append([
            v.key, v.what, r["precision"], v.total_steps, r["chunks"], r["wall"],
            " / ".join(f"{w:.1f}" for w in r["walls"]) if len(r["walls"]) > 1 else "", r["cpu"], r["first_step_at"],
            r["fixed"], C.ratio(r["wall"], base["wall"]), f"{var_r:.2f}×" if var_r else "—",
            f"{C.ratio(r['wall'], results[matched]['wall'])} ({matched})" if matched else "—",
            C.ratio(r["cpu"], base["cpu"]), r["step_median_ms"], r["load"],
        ])  # fmt: skip
    report.table(
        "Runs (seconds; ratios against the bare run of the same length at TRL's defaults, and at the same precision)",
        ["run", "what", "precision", "steps", "chunks", "wall", "every run's wall", "CPU", "1st step at", "fixed costs",
         "wall ratio vs TRL defaults", "ratio excl. fixed", "wall ratio, same precision", "CPU ratio",
         "median step ms", "load"],
        rows,
    )  # fmt: skip
    for group in _groups(todo):
        keys = [v.key for v in group]
        rows = []
        for bucket, (label, kind) in C.BUCKETS.items():
            vals = [results[k]["breakdown"][bucket] for k in keys]
            if max(vals) >= 0.005:
                rows.append([label, kind, *vals])
        rows.append(["**total (= wall)**", "", *[sum(results[k]["breakdown"].values()) for k in keys]])
        report.table(
            f"Where the time went, seconds ({', '.join(keys)}; exclusive buckets that add up to the wall time)",
            ["bucket", "kind", *keys],
            rows,
        )
    rows = []
    for v in todo:
        r = results[v.key]
        save_s = sum(sec for key, sec in r["breakdown"].items() if C.BUCKETS[key][1] == "save")
        starts = [c["first_step_after"] for c in r["train_calls"] if c["first_step_after"] is not None]
        rows.append([v.key, r["fixed"], r["chunks"], statistics.mean(starts) if starts else None, r["saves"],
                     save_s / r["saves"] * 1e3 if r["saves"] else None])  # fmt: skip
    report.table(
        "Fixed and per-save costs (from the buckets above)",
        ["run", "fixed s", "chunks", "each train() call: start → 1st step s", "saves",
         "per save ms (save buckets, incl. all other ledger calls)"],
        rows,
    )  # fmt: skip
    notes = [
        "fixed = once per run (process start, imports, Prefect server, end-of-run evaluate/export/artifacts); "
        "ratio excl. fixed = (wall − fixed) / (bare wall − bare fixed).",
    ]
    srv = report.data.get("running_server_startup_seconds")
    temp = [v.key for v in todo if v.kind == "ckptflow" and v.server == "temp"]
    if temp:
        start = statistics.median(results[k]["prefect_server_start"] for k in temp)
        stop = statistics.median(results[k]["prefect_server_stop"] for k in temp)
        notes.append(
            f"Prefect temporary server inside `ckptflow run`: start {start:.1f}s + stop {stop:.1f}s per run"
            + (f"; a running `prefect server start` took {srv:.1f}s to come up once, then 0 s per run." if srv else ".")
        )
    notes += _derived(todo, results)
    report.note("\n".join(f"- {n}" for n in notes))


def _paired_ratios(todo: list[Variant], results: dict[str, dict]) -> list[str]:
    """Each repeated variant against its bare baseline, and each repeated ckptflow variant against the bare script
    run as a Prefect flow (a-pf), run by run: the pairs ran back to back
    (interleaved), so a machine that drifts over the bench (other tenants, thermal) affects both runs of
    a pair alike, where the two medians may come from different moments."""
    pairs = [(v.key, v.baseline) for v in todo if v.key != v.baseline]
    # ckptflow beyond what Prefect itself costs: against the bare script run as a Prefect flow
    pairs += [(v.key, pf.key) for v in todo if v.kind == "ckptflow"
              for pf in todo if pf.prefect_tasks and pf.server == v.server and pf.baseline == v.baseline]  # fmt: skip
    by = {v.key: v for v in todo}
    out = []
    for key, base in pairs:
        if base not in by or by[key].repeat < 2 or by[base].repeat != by[key].repeat:
            continue
        ratios = [b / a for a, b in zip(results[base]["walls"], results[key]["walls"])]
        out.append(
            f"{key} / {base}, interleaved pairs (run i of each): "
            f"{', '.join(f'{r:.3f}×' for r in ratios)}; median {statistics.median(ratios):.3f}×"
        )
    return out


def _derived(todo: list[Variant], results: dict[str, dict]) -> list[str]:
    """Marginal costs from pairs of runs that differ in one thing."""
    by = {v.key: v for v in todo}
    out = _paired_ratios(todo, results)
    for key in ("b-long-srv", "b-long"):
        if key not in results or "a-long" not in results:
            continue
        a, b = results["a-long"], results[key]
        var = (b["wall"] - b["fixed"]) / (a["wall"] - a["fixed"])
        for minutes in (10, 60):
            t = minutes * 60
            out.append(
                f"{key}, extrapolated to a {minutes}-minute bare run (same per-step/per-save ratio, same fixed costs): "
                f"{(var * (t - a['fixed']) + b['fixed']) / t:.3f}×"
            )
    ds = sorted((v for v in todo if v.key.startswith("d-")), key=lambda v: results[v.key]["chunks"])
    if len(ds) >= 2:
        lo, hi = results[ds[0].key], results[ds[-1].key]
        if hi["chunks"] > lo["chunks"]:
            extra = hi["chunks"] - lo["chunks"]
            per = (hi["wall"] - lo["wall"]) / extra
            out.append(f"one more chunk costs {per:.2f}s ({ds[-1].key} vs {ds[0].key}: wall difference / extra chunks)")
            if ds[0].repeat > 1 and ds[0].repeat == ds[-1].repeat:  # ran interleaved: each round is a pair
                pairs = [(b - a) / extra for a, b in zip(lo["walls"], hi["walls"])]
                out.append(f"one more chunk, interleaved pairs ({ds[-1].key} − {ds[0].key}, run i of each, / extra chunks): "
                           f"{', '.join(f'{p:.2f}s' for p in pairs)}; median {statistics.median(pairs):.2f}s")  # fmt: skip
    if "c" in results and "b-srv" in results and by["c"].total_steps == by["b-srv"].total_steps:
        c, b = results["c"], results["b-srv"]
        per = (c["wall"] - b["wall"]) / c["chunks"]
        imports = c["breakdown"]["worker_imports"] / c["chunks"]
        out.append(f"launcher=subprocess costs {per:.2f}s per chunk (c vs b-srv), of which re-importing "
                   f"torch/transformers/TRL in the child {imports:.2f}s")  # fmt: skip
    return out


def _matched_bare(v: Variant, todo: list[Variant], results: dict[str, dict]) -> str | None:
    """The bare run of the same workload that trained in the same precision as `v` (None if none did)."""
    if v.kind == "bare":
        return None
    want = results[v.key]["precision"]
    return next((b.key for b in todo if b.kind == "bare" and (b.total_steps, b.save_steps) == (v.total_steps, v.save_steps)
                 and results[b.key]["precision"] == want), None)  # fmt: skip


def _groups(todo: list[Variant]) -> list[list[Variant]]:
    groups: dict[str, list[Variant]] = {}
    for v in todo:
        groups.setdefault(v.baseline, []).append(v)
    return list(groups.values())


if __name__ == "__main__":
    main()
