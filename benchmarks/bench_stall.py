"""Benchmark 5 — checkpoint stall: how long training is blocked per save, at several save intervals.

The same 200-step fine-tune, bare and with ckptflow's library path (one chunk, no Prefect,
so only checkpointing differs), saving (and evaluating) every N steps. Per save, from the
probe's spans on the training thread inside `trainer.train`:

- HF write: `Trainer._save_checkpoint` (weights, optimizer, scheduler, RNG, trainer state;
  the bare run's HF rotation included);
- commit: the `on_save` callbacks (ckptflow: queueing the commit for the background committer,
  waiting only while it is `max_pending` jobs behind);
- pre-save: ledger calls and committer waits in `on_step_end` at save steps (ckptflow: queueing
  the `writing` row; waiting only if the checkpoint's directory were still being committed).

blocked = HF write + commit + pre-save; share = Σ blocked (+ the chunk-end wait) / time in `trainer.train`.
The chunk end waits once for the last commit (`committer.close`): reported apart, and spread over
the saves in "mean incl. chunk end". Evaluation at save steps is reported apart: it is not checkpointing.
The background commit (hash + fsync, manifest, ledger, retention on the committer thread) is timed
from the probe's call totals, which count every thread.

The line this benchmark exists for: ckptflow's blocked time per save / HF's own save (the bare
run's `_save_checkpoint`), at save every 10, 50 and 100 steps (target ≤ 1.10×).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DRIVER = C.BENCH_DIR / "_drive.py"
# Training-thread calls that wait at a save step outside on_save (the probe records only the training thread's).
PRE_SAVE_LEDGER = ("ledger.begin_checkpoint", "ledger.checkpoints")
PRE_SAVE_WAITS = ("committer.wait_for", "committer.submit")
# Target of issue 13: blocked time per save against HF's own save.
TARGET_RATIO = 1.10


def _calls(p: C.Proc, name: str) -> tuple[int, float]:
    """(calls, seconds) of a probed function over every thread of the run's processes."""
    n = t = 0.0
    for probe in p.probes:
        count, seconds = probe.get("calls", {}).get(name, (0, 0.0))
        n, t = n + count, t + seconds
    return int(n), t


def stall(p: C.Proc) -> dict:
    """Per-save medians (ms) and the share of train() spent blocked by saves."""
    saves, commits, train = p.spans("hf.save"), p.spans("cb.on_save"), p.spans("hf.train")
    train_s = sum(s["t1"] - s["t0"] for s in train)
    events = [(a, b) for probe in p.probes for _cat, name, a, b in probe.get("events", []) if name in PRE_SAVE_LEDGER]
    events += [(s["t0"], s["t1"]) for s in p.spans() if s["n"] in PRE_SAVE_WAITS]
    events.sort()
    per_save = []
    prev_end = min((t["t0"] for t in train), default=0.0)
    for k, save in enumerate(saves):
        commit = commits[k] if k < len(commits) else None
        # calls since the previous save, outside commit callbacks: this save's `writing` row + disk check + waits
        pre = sum(b - a for a, b in events if prev_end <= a <= save["t0"]
                  and not any(c["t0"] <= a <= c["t1"] for c in commits))  # fmt: skip
        write = save["t1"] - save["t0"]
        com = commit["t1"] - commit["t0"] if commit else 0.0
        per_save.append({"write": write, "commit": com, "pre": pre, "blocked": write + com + pre})
        prev_end = commit["t1"] if commit else save["t1"]

    def med(key: str) -> float | None:
        return statistics.median(x[key] for x in per_save) * 1e3 if per_save else None

    chunk_end = p.total("committer.close")
    evals = [s["t1"] - s["t0"] for s in p.spans("hf.eval")]
    steps = C.step_intervals(p)
    n = max(len(saves), 1)
    blocked_total = sum(x["blocked"] for x in per_save) + chunk_end
    background = {key: _calls(p, key)[1] / n * 1e3 for key in
                  ("integrity.hash_files", "integrity.write_manifest", "retention.apply_retention")}  # fmt: skip
    return {
        "saves": len(saves),
        "write_ms": med("write"),
        "commit_ms": med("commit"),
        "pre_ms": med("pre"),
        "blocked_ms": med("blocked"),
        "chunk_end_ms": chunk_end * 1e3,
        "blocked_mean_ms": blocked_total / n * 1e3,
        "share": blocked_total / train_s if train_s else None,
        "eval_ms": statistics.median(evals) * 1e3 if evals else None,
        "train_s": train_s,
        "step_ms": statistics.median(steps) * 1e3 if steps else None,
        "commit_mean_ms": sum(x["commit"] for x in per_save) / n * 1e3,
        # off the training thread (the committer), per save, mean: hash + fsync of the files; writing the
        # manifest (given the hashes); retention
        "hash_ms": background["integrity.hash_files"],
        "manifest_ms": background["integrity.write_manifest"],
        "retention_ms": background["retention.apply_retention"],
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
                         C.ratio(x["blocked_ms"], r["bare"]["write_ms"]), x["chunk_end_ms"], x["blocked_mean_ms"],
                         f"{x['share'] * 100:.1f}%" if x["share"] is not None else "—", x["eval_ms"], x["step_ms"]])  # fmt: skip
    report.table(
        f"Per save, milliseconds, median over the saves ({total} steps; blocked = HF write + commit + pre-save, on the "
        "training thread; ratio = blocked / the bare run's HF save; chunk end = the one wait for the last commit; "
        "share = (all saves' blocked time + chunk end) / time in train())",
        ["save every", "run", "saves", "HF write", "commit", "pre-save", "blocked", "ratio to HF save", "chunk end",
         "mean incl. chunk end", "share of train()", "eval (apart)", "median step"],
        rows,
    )  # fmt: skip
    comp = [[every, r["ckptflow"]["hash_ms"], r["ckptflow"]["manifest_ms"], r["ckptflow"]["retention_ms"]]
            for every, r in results.items()]
    report.table("ckptflow's background commit per save, milliseconds (mean; on the committer thread, not blocking "
                 "training)", ["save every", "hash + fsync files", "manifest write + fsync", "retention"], comp)  # fmt: skip
    ratios = {}
    for every, r in results.items():
        ck, hf = r["ckptflow"]["blocked_ms"], r["bare"]["write_ms"]
        ratios[every] = ck / hf if ck is not None and hf else None
        shown = f"{ratios[every]:.2f}x" if ratios[every] is not None else "n/a"
        verdict = "ok" if ratios[every] is not None and ratios[every] <= TARGET_RATIO else "OVER"
        report.note(f"save every {every}: ckptflow blocked per save {C.fmt(ck)} ms / HF save {C.fmt(hf)} ms = {shown} "
                    f"(target <= {TARGET_RATIO:.2f}x: {verdict})")  # fmt: skip
    report.data.update(total_steps=total, intervals=intervals, runs=results, ratio_to_hf_save=ratios)
    report.save()


if __name__ == "__main__":
    main()
