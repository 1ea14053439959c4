"""Benchmark 4 — ledger scale: 100,000 checkpoint rows over 1,000 runs.

The ledger (SQLite, WAL; schema from the Alembic migrations) is filled with 1,000 runs of
100 checkpoints each: in 999 runs every 10th checkpoint is committed and the rest pruned
(what retention leaves behind), and one run ("big") has all 100 committed. Timed, median of
several calls:

- in this process: `views.checkpoints_view` (`checkpoints big --json`), `views.runs_view`
  (`runs --json`), `retention.apply_retention(dry_run=True)` on "big" (one retention decision);
  baselines: the same rows with a raw sqlite3 query (the floor), and the pure policy
  decision on in-memory rows; plus the old one-query-per-run `runs_view` for comparison;
- as CLI processes: `ckptflow checkpoints big --json`, `ckptflow runs --json`,
  `ckptflow prune big --dry-run --json`, against `ckptflow --help` (process + import floor).
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BIG = "big"


def build_ledger(home: Path, runs: int, per_run: int) -> str:
    """Fill a fresh ledger; returns its URL."""
    from sqlalchemy import insert

    from ckptflow.ledger import Ledger
    from ckptflow.ledger.models import Checkpoint, Run
    from ckptflow.settings import Settings

    settings = Settings(home=home)
    url = settings.ledger
    config = {"settings": settings.to_json(), "data_fingerprint": "0" * 64}
    ledger = Ledger(url)
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    names = [BIG] + [f"run-{i:04d}" for i in range(1, runs)]
    with ledger._write.begin() as s:
        s.execute(insert(Run), [
            {"name": n, "status": "completed", "fingerprint": f"{i:064x}", "config": config,
             "base_model": "builtin:bench-gpt2", "total_steps": per_run * 10, "metrics": {},
             "created_at": t0 + timedelta(minutes=i), "updated_at": t0 + timedelta(minutes=i)}
            for i, n in enumerate(names)
        ])  # fmt: skip
    ids = {r.name: r.id for r in ledger.list_runs()}
    rows = []
    for name, rid in ids.items():
        for k in range(1, per_run + 1):
            step = k * 10
            committed = name == BIG or k % 10 == 0
            rows.append({
                "run_id": rid, "step": step, "epoch": step / 64, "state": "committed" if committed else "pruned",
                "path": f"{home}/runs/{name}/checkpoints/checkpoint-{step}",
                "metrics": {"eval_loss": 2.0 + ((k * 7919) % 97) / 97, "loss": 2.5 - k / per_run,
                            "eval_entropy": 3.1, "eval_mean_token_accuracy": 0.4, "epoch": step / 64},
                "bytes": 513_072, "manifest_sha256": f"{rid * 1000 + k:064x}",
                "created_at": t0 + timedelta(seconds=step), "pruned_at": None if committed else t0,
                "reason": None if committed else "retention: not among the 2 best by eval_loss",
            })  # fmt: skip
    with ledger._write.begin() as s:
        for i in range(0, len(rows), 20_000):
            s.execute(insert(Checkpoint), rows[i : i + 20_000])
    ledger.close()
    return url


def legacy_runs_view(ledger) -> list[dict]:
    """runs_view as first written: one checkpoints query (and a settings parse) per run."""
    from ckptflow.ledger import CheckpointState
    from ckptflow.policy import best_step
    from ckptflow.runs import run_settings

    out = []
    for run in ledger.list_runs():
        ck = run_settings(run).checkpoint
        committed = ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED])
        best = best_step(committed, ck.metric_key, ck.greater_is_better) if ck.evaluates else None
        out.append({"name": run.name, "best_step": best, "last_step": max((c.step for c in committed), default=0)})
    return out


def raw_checkpoints(db: Path, run_id: int) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT id, step, epoch, path, state, metrics, bytes, manifest_sha256, created_at, pruned_at, reason "
            "FROM checkpoints WHERE run_id = ? AND state = 'committed' ORDER BY step",
            (run_id,),
        ).fetchall()
    return [(*r, json.loads(r[5])) for r in rows]


def raw_runs(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT id, name, status, total_steps, base_model, config, created_at, updated_at FROM runs "
            "ORDER BY created_at DESC"
        ).fetchall()
    return [(*r, json.loads(r[5])) for r in rows]


def median_time(fn, repeat: int) -> tuple[float, object]:
    fn()  # warm (first-call imports, statement caches)
    return C.timed(fn, repeat=repeat)


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    sys.path[:0] = [str(C.TREE / "src")]
    from ckptflow.ledger import CheckpointState, Ledger
    from ckptflow.policy import decide_retention, retention_policy
    from ckptflow.retention import apply_retention
    from ckptflow.runs import run_settings
    from ckptflow.views import checkpoints_view, runs_view

    runs, per_run = (20, 10) if args.quick else (1000, 100)
    repeat = 3 if args.quick else 5
    report = C.Report("ledger", f"4. Ledger scale: {runs * per_run:,} checkpoint rows over {runs:,} runs", args.quick)
    with C.Workdir(args, "ledger") as work:
        home = work / "home"
        t0 = time.perf_counter()
        url = build_ledger(home, runs, per_run)
        build_s = time.perf_counter() - t0
        db = home / "ledger.db"
        open_s, _ = median_time(lambda: Ledger(url).close(), repeat)
        ledger = Ledger(url)
        big = ledger.get_run(BIG)
        ck = run_settings(big).checkpoint
        committed = ledger.checkpoints(big.id, states=[CheckpointState.COMMITTED])
        timings = {
            "open": open_s,
            "checkpoints_view": median_time(lambda: checkpoints_view(ledger, BIG), repeat),
            "raw_checkpoints": median_time(lambda: raw_checkpoints(db, big.id), repeat),
            "runs_view": median_time(lambda: runs_view(ledger), repeat),
            "legacy_runs_view": median_time(lambda: legacy_runs_view(ledger), 1 if not args.quick else repeat),
            "raw_runs": median_time(lambda: raw_runs(db), repeat),
            "apply_retention": median_time(lambda: apply_retention(ledger, big.id, ck, dry_run=True), repeat),
            "decide_retention": median_time(lambda: decide_retention(retention_policy(ck), committed), repeat),
        }
        n_ckpt = len(timings["checkpoints_view"][1])
        n_runs = len(timings["runs_view"][1])
        decision = timings["apply_retention"][1]
        assert n_runs == runs and n_ckpt == per_run, (n_runs, n_ckpt)
        assert [r["name"] for r in timings["runs_view"][1]] == [r["name"] for r in timings["legacy_runs_view"][1]]
        same_best = all(
            (a["best_step"], a["last_step"]) == (b["best_step"], b["last_step"])
            for a, b in zip(timings["runs_view"][1], timings["legacy_runs_view"][1])
        )
        ledger.close()
        cli = cli_timings(work, home, 1 if args.quick else repeat)
        plans = query_plans(db, big.id)
    t = {k: v[0] if isinstance(v, tuple) else v for k, v in timings.items()}
    report.table(
        "In-process calls (milliseconds, median; ratio against the baseline on the same rows)",
        ["call", "rows", "ms", "baseline", "baseline ms", "ratio"],
        [
            ["Ledger(url) open (engine + migration check)", "—", t["open"] * 1e3, "—", None, "—"],
            ["checkpoints_view(big)", n_ckpt, t["checkpoints_view"] * 1e3, "raw sqlite3 SELECT + json",
             t["raw_checkpoints"] * 1e3, C.ratio(t["checkpoints_view"], t["raw_checkpoints"])],
            ["runs_view()", n_runs, t["runs_view"] * 1e3, "raw sqlite3 SELECT + json", t["raw_runs"] * 1e3,
             C.ratio(t["runs_view"], t["raw_runs"])],
            ["old runs_view (one query per run)", n_runs, t["legacy_runs_view"] * 1e3, "raw sqlite3 SELECT + json",
             t["raw_runs"] * 1e3, C.ratio(t["legacy_runs_view"], t["raw_runs"])],
            ["apply_retention(big, dry_run=True)", n_ckpt, t["apply_retention"] * 1e3, "policy decision in memory",
             t["decide_retention"] * 1e3, C.ratio(t["apply_retention"], t["decide_retention"])],
        ],
    )  # fmt: skip
    floor = cli["ckptflow --help"]
    report.table(
        "CLI processes (seconds, median; ratio against `ckptflow --help`: interpreter + imports)",
        ["command", "seconds", "ratio to floor"],
        [[cmd, sec, C.ratio(sec, floor)] for cmd, sec in cli.items()],
    )
    report.note(
        f"- ledger built in {build_s:.1f}s; retention on big keeps {len(decision.keep)}, would prune "
        f"{len(decision.prune)}; new and old runs_view agree on best/last step: {same_best}.\n"
        + "\n".join(f"- query plan, {name}: `{plan}`" for name, plan in plans.items())
    )
    report.data.update(rows=runs * per_run, runs=runs, build_s=build_s, inprocess_s=t, cli_s=cli, plans=plans,
                       same_best=same_best)  # fmt: skip
    report.save()


def cli_timings(work: Path, home: Path, repeat: int) -> dict[str, float]:
    env = C.base_env(home)
    commands = {
        "ckptflow --help": [C.CKPTFLOW, "--help"],
        f"ckptflow checkpoints {BIG} --json": [C.CKPTFLOW, "checkpoints", BIG, "--json"],
        "ckptflow runs --json": [C.CKPTFLOW, "runs", "--json"],
        f"ckptflow prune {BIG} --dry-run --json": [C.CKPTFLOW, "prune", BIG, "--dry-run", "--json"],
    }
    out = {}
    for label, cmd in commands.items():
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if proc.returncode != 0:
                raise RuntimeError(f"{label} exited {proc.returncode}: {proc.stderr[-2000:]}")
            if "--json" in cmd:
                json.loads(proc.stdout)
        out[label] = statistics.median(times)
    return out


def query_plans(db: Path, run_id: int) -> dict[str, str]:
    queries = {
        "checkpoints(run, committed)": f"SELECT * FROM checkpoints WHERE run_id = {run_id} AND state = 'committed' ORDER BY step",
        "best_metrics counts": "SELECT runs.id, count(checkpoints.id), max(checkpoints.step) FROM runs LEFT OUTER JOIN "
        "checkpoints ON checkpoints.run_id = runs.id AND checkpoints.state = 'committed' GROUP BY runs.id",
    }
    with sqlite3.connect(db) as conn:
        return {k: "; ".join(str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + q)) for k, q in queries.items()}


if __name__ == "__main__":
    main()
