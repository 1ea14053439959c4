"""Benchmark 5 — checkpoint stall: how long training is blocked per save, at several save intervals.

The same 200-step fine-tune, bare and with ckptflow's library path (one chunk, no Prefect,
so only checkpointing differs), saving (and evaluating) every N steps. Per save, from the
probe's spans inside `trainer.train`:

- HF write: `Trainer._save_checkpoint` (weights, optimizer, scheduler, RNG, trainer state;
  the bare run's HF rotation included);
- commit: the `on_save` callbacks (ckptflow: manifest hash + fsync, ledger commit, retention);
- pre-save: ledger calls in `on_step_end` at save steps (ckptflow: the `writing` row and the
  free-disk estimate).

blocked = HF write + commit + pre-save; share = Σ blocked / time in `trainer.train`.
Evaluation at save steps is reported apart: it is not checkpointing.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DRIVER = C.BENCH_DIR / "_drive.py"
PRE_SAVE_LEDGER = ("ledger.begin_checkpoint", "ledger.checkpoints")


def stall(p: C.Proc) -> dict:
    """Per-save medians (ms) and the share of train() spent blocked by saves."""
    saves, commits, train = p.spans("hf.save"), p.spans("cb.on_save"), p.spans("hf.train")
    train_s = sum(s["t1"] - s["t0"] for s in train)
    events = sorted(
        (a, b) for probe in p.probes for _cat, name, a, b in probe.get("events", []) if name in PRE_SAVE_LEDGER
    )
    per_save = []
    prev_end = min((t["t0"] for t in train), default=0.0)
    for k, save in enumerate(saves):
        commit = commits[k] if k < len(commits) else None
        # ledger calls since the previous save, outside commit callbacks: this save's `writing` row + disk check
        pre = sum(b - a for a, b in events if prev_end <= a <= save["t0"]
                  and not any(c["t0"] <= a <= c["t1"] for c in commits))  # fmt: skip
        write = save["t1"] - save["t0"]
        com = commit["t1"] - commit["t0"] if commit else 0.0
        per_save.append({"write": write, "commit": com, "pre": pre, "blocked": write + com + pre})
        prev_end = commit["t1"] if commit else save["t1"]

    def med(key: str) -> float | None:
        return statistics.median(x[key] for x in per_save) * 1e3 if per_save else None

    evals = [s["t1"] - s["t0"] for s in p.spans("hf.eval")]
    steps = C.step_intervals(p)
    n = max(len(saves), 1)
    return {
        "saves": len(saves),
        "write_ms": med("write"),
        "commit_ms": med("commit"),
        "pre_ms": med("pre"),
        "blocked_ms": med("blocked"),
        "share": sum(x["blocked"] for x in per_save) / train_s if train_s else None,
        "eval_ms": statistics.median(evals) * 1e3 if evals else None,
        "train_s": train_s,
        "step_ms": statistics.median(steps) * 1e3 if steps else None,
        "commit_mean_ms": sum(x["commit"] for x in per_save) / n * 1e3,
        "manifest_ms": p.total("integrity.write_manifest") / n * 1e3,
        "retention_ms": p.total("retention.apply_retention") / n * 1e3,
        "per_save": per_save,
    }


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    total, intervals = (4, [2]) if args.quick else (200, [10, 50, 100])
    report = C.Report("stall", "5. Checkpoint stall: training blocked per save", args.quick)
    results: dict[str, dict] = {}
    with C.Workdir(args, "stall") as work:
        home, model, data = C.prepare_workload(work)
        for every in intervals:
            print(f"[stall] save every {every}: bare ...", flush=True)
            bare = C.run_probed(f"bare-{every}", C.bare_args(model, data, work / f"bare-{every}", total_steps=total,
                                save_steps=every), C.base_env(home), cwd=work)  # fmt: skip
            print(f"[stall] save every {every}: ckptflow ...", flush=True)
            env = C.ckptflow_env(home, total_steps=total, save_steps=every, chunk_steps=total)
            ck = C.run_probed(f"ckptflow-{every}", [C.PYTHON, str(DRIVER), f"stall-{every}"], env, cwd=work)
            results[str(every)] = {"bare": stall(bare), "ckptflow": stall(ck)}
    rows = []
    for every, r in results.items():
        for who in ("bare", "ckptflow"):
            x = r[who]
            rows.append([every, who, x["saves"], x["write_ms"], x["commit_ms"], x["pre_ms"], x["blocked_ms"],
                         C.ratio(x["blocked_ms"], r["bare"]["blocked_ms"]),
                         f"{x['share'] * 100:.1f}%" if x["share"] is not None else "—", x["eval_ms"], x["step_ms"]])  # fmt: skip
    report.table(
        f"Per save, milliseconds, median over the saves ({total} steps; blocked = HF write + commit + pre-save ledger; "
        "ratio against bare; share = all saves' blocked time / time in train())",
        ["save every", "run", "saves", "HF write", "commit", "pre-save", "blocked", "ratio", "share of train()",
         "eval (apart)", "median step"],
        rows,
    )  # fmt: skip
    comp = [[every, r["ckptflow"]["manifest_ms"], r["ckptflow"]["retention_ms"],
             r["ckptflow"]["commit_mean_ms"] - r["ckptflow"]["manifest_ms"] - r["ckptflow"]["retention_ms"]]
            for every, r in results.items()]  # fmt: skip
    report.table("ckptflow's commit per save, milliseconds (mean)", ["save every", "manifest (hash + fsync)", "retention",
                 "ledger commit + rest"], comp)  # fmt: skip
    report.data.update(total_steps=total, intervals=intervals, runs=results)
    report.save()


if __name__ == "__main__":
    main()
