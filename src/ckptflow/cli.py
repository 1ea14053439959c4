"""`ckptflow` command line. Thin: each command calls one library function or flow; formatting lives here.

Exit codes: 0 ok, 1 failed (or corruption found by `verify`), 2 bad input.
`--json` prints exactly one JSON document on stdout; logs go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

# Before Prefect or HF are imported: offline, no analytics, our logs in Prefect's run logs.
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "ckptflow",
}.items():
    os.environ.setdefault(_key, _value)

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ckptflow.errors import BadInputError, CkptflowError
from ckptflow.paths import validate_run_name
from ckptflow.settings import Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Crash-safe, policy-driven LoRA fine-tuning.")
err = Console(stderr=True)
out = Console()

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML settings file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def _exits(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map ckptflow errors to exit codes with a one-paragraph message on stderr."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BadInputError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)  # a name may hold [ ]
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except CkptflowError as exc:
            err.print(f"[bold red]failed:[/] {escape(str(exc))}", markup=True, highlight=False)
            raise typer.Exit(EXIT_FAILED) from None

    return wrapper


def _emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def _settings(config: Path | None) -> Settings:
    settings = load_settings(config)
    return settings.model_copy(update={"home": settings.home.resolve()})


def _ledger(settings: Settings):
    from ckptflow.ledger import Ledger

    return Ledger(settings.ledger, home=settings.home)


@app.command()
@_exits
def run(
    config: ConfigOpt = None,
    run_name: Annotated[str | None, typer.Option("--run-name", "-n", help="Run to create or resume.")] = None,
    new: Annotated[bool, typer.Option("--new", help="Start a fresh run even if the name exists.")] = False,
) -> None:
    """Run the finetune flow; resumes run NAME if it exists and is unfinished."""
    if run_name is not None:
        validate_run_name(run_name, suffix="-2" if new else "")  # before anything is read or started
    from ckptflow.quiet import quiet_libraries

    quiet_libraries()
    settings = _settings(config)
    for warning in settings.warnings():
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    from ckptflow import pipeline

    prepared = pipeline.prepare(settings)  # bad data or an unknown model fails here, before Prefect starts
    with _ledger(settings) as ledger:  # changed settings/data, or a run being trained: exit 2 before Prefect starts
        from ckptflow.runs import refuse_early

        refuse_early(ledger, settings, data_fingerprint=prepared.data_fingerprint, run_name=run_name, new=new)
    from ckptflow.planner import plan_for_settings

    for warning in plan_for_settings(settings).warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    from flows.finetune import finetune

    try:
        result = finetune(run_name=run_name, new=new, config_file=str(config) if config else None)
    except (BadInputError, CkptflowError):
        raise
    except Exception as exc:  # a chunk that failed all its retries, an export check, ...
        err.print(f"[bold red]failed:[/] {type(exc).__name__}: {exc}", highlight=False)
        err.print(f"run it again to resume from the last committed checkpoint", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    if result.get("already_completed"):
        err.print(f"run {result['run']} already completed; `ckptflow checkpoints {result['run']}` shows it, --new trains again")
        return
    export, evaluation = result.get("export", {}), result.get("evaluation", {})
    err.print(f"run {result['run']} completed", highlight=False)
    if "best_eval_loss" in evaluation:
        err.print(
            f"  eval loss base → best (step {evaluation['best_step']}): "
            f"{evaluation['base_eval_loss']:.4f} → {evaluation['best_eval_loss']:.4f}",
            highlight=False,
        )
    err.print(f"  exported step {export.get('step')} to {export.get('path')}", highlight=False, soft_wrap=True)


@app.command()
@_exits
def plan(
    config: ConfigOpt = None,
    at: Annotated[int | None, typer.Option("--at", help="Where would a run that died at STEP resume?")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Chunks, save/eval points, what is kept, and disk needed — without training."""
    from ckptflow.planner import plan_for_settings

    document = plan_for_settings(_settings(config), at_step=at).to_json()
    if as_json:
        _emit_json(document)
        return
    _print_plan(document)


def _steps(steps: list[int], limit: int = 12) -> str:
    if len(steps) <= limit:
        return ", ".join(map(str, steps)) or "none"
    return f"{', '.join(map(str, steps[:limit // 2]))}, … , {', '.join(map(str, steps[-3:]))} ({len(steps)} in all)"


def _print_plan(p: dict[str, Any]) -> None:
    mib = 2**20
    chunks = ", ".join(f"{c['start_step']}-{c['end_step']}" for c in p["chunks"])
    out.print(f"total steps      {p['total_steps']} ({p['steps_per_epoch']} per epoch)", highlight=False)
    out.print(f"chunks           {len(p['chunks'])}: {chunks}", highlight=False)
    out.print(f"save points      {_steps(p['save_points'])}", highlight=False)
    out.print(f"eval points      {_steps(p['eval_points'])}", highlight=False)
    kept = p["kept_at_end"]
    out.print(f"kept at the end  {_steps(kept) if isinstance(kept, list) else kept}", highlight=False)
    out.print(f"per checkpoint   ~{p['bytes_per_checkpoint'] / mib:.2f} MiB; at most {p['checkpoints_on_disk_max']} on disk", highlight=False)
    verdict = "fits" if p["fits"] else "[red]does NOT fit[/]"
    out.print(f"disk             needs ~{p['disk_needed_bytes'] / mib:.1f} MiB, {p['free_bytes'] / mib:.0f} MiB free: {verdict}", highlight=False)
    if p["at"]:
        at = p["at"]
        out.print(f"died at {at['died_at']}    exist: {_steps(at['exist'])} ({at['exist_rule']})", highlight=False)
        resume = f"checkpoint-{at['resume_from']}" if at["resume_from"] is not None else "scratch (nothing saved yet)"
        out.print(f"resume from      {resume}", highlight=False)
    for warning in p["warnings"]:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)


@app.command()
@_exits
def runs(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Runs with status, steps and best metric."""
    from ckptflow.views import runs_view

    ledger = _ledger(_settings(config))
    try:
        rows = runs_view(ledger)
    finally:
        ledger.close()
    if as_json:
        _emit_json(rows)
        return
    _table(rows, ["name", "status", "last_step", "total_steps", "best_step", "best_metric", "updated_at"])


@app.command()
@_exits
def checkpoints(
    run_name: Annotated[str, typer.Argument(help="Run name.")],
    all_states: Annotated[bool, typer.Option("--all", help="Include pruned, corrupt and partial ones.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Committed (or all) checkpoints of a run."""
    validate_run_name(run_name, option="the RUN argument")
    from ckptflow.views import checkpoints_view

    ledger = _ledger(_settings(config))
    try:
        rows = checkpoints_view(ledger, run_name, include_all=all_states)
    finally:
        ledger.close()
    if as_json:
        _emit_json(rows)
        return
    _table(rows, ["step", "state", "metric", "bytes", "is_best", "location", "reason", "path"])


@app.command()
@_exits
def verify(run_name: Annotated[str, typer.Argument()], config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Re-hash every committed checkpoint and look for partial ones; exit 1 when any file differs or is missing."""
    validate_run_name(run_name, option="the RUN argument")
    from ckptflow.recovery import verify_run
    from ckptflow.runs import get_run

    settings = _settings(config)
    ledger = _ledger(settings)
    try:
        run_record = get_run(ledger, run_name)
        problems = verify_run(ledger, run_record.id, settings.checkpoints_dir(run_name), remote_url=settings.checkpoint.remote_url)
        checked = [c.step for c in ledger.checkpoints(run_record.id, states=["committed"])]
    finally:
        ledger.close()
    document = {"run": run_name, "checked": checked, "ok": not problems, "problems": {str(k): v for k, v in problems.items()}}
    if as_json:
        _emit_json(document)
    elif problems:
        for step, items in sorted(problems.items()):
            for item in items:
                err.print(f"[red]checkpoint-{step}[/]: {item}", highlight=False)
        err.print(
            f"{len(problems)} problem checkpoint(s) in run {run_name}: resume and export never use them; they fall "
            "back to the newest (resume) or best (export) checkpoint that verifies and move these to quarantine/",
            highlight=False,
        )
    else:
        out.print(f"{len(checked)} committed checkpoints verified: {checked}")
    if problems:
        raise typer.Exit(EXIT_FAILED)


@app.command()
@_exits
def prune(
    run_name: Annotated[str, typer.Argument()],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the decision; change nothing.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply the retention policy now (the run's recorded policy, or --config's)."""
    validate_run_name(run_name, option="the RUN argument")
    from ckptflow.retention import apply_retention
    from ckptflow.runs import get_run, run_settings

    settings = _settings(config)
    ledger = _ledger(settings)
    try:
        run_record = get_run(ledger, run_name)
        policy_settings = settings if config else run_settings(run_record)
        decision = apply_retention(ledger, run_record.id, policy_settings.checkpoint, dry_run=dry_run)
    finally:
        ledger.close()
    document = {
        "run": run_name,
        "dry_run": dry_run,
        "keep": {str(k): v for k, v in sorted(decision.keep.items())},
        "prune": {str(k): v for k, v in sorted(decision.prune.items())},
    }
    if as_json:
        _emit_json(document)
        return
    verb = "would prune" if dry_run else "pruned"
    for step, reason in sorted(decision.keep.items()):
        out.print(f"keep  checkpoint-{step}: {reason}", highlight=False)
    for step, reason in sorted(decision.prune.items()):
        out.print(f"{verb} checkpoint-{step}: {reason}", highlight=False)


@app.command()
@_exits
def export(
    run_name: Annotated[str, typer.Argument()],
    step: Annotated[int | None, typer.Option("--step", help="Export this step instead of the best.")] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Target directory: new, empty, or an earlier export (with --force).")] = None,
    no_merge: Annotated[bool, typer.Option("--no-merge", help="Export the LoRA adapter only.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier ckptflow export at --out.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export the best (or --step) verified checkpoint as a model transformers can load."""
    validate_run_name(run_name, option="the RUN argument")
    from ckptflow.export import export_target

    settings = _settings(config)
    export_target(settings, run_name, out=out_dir, force=force)  # refuse before the ledger or a model is loaded
    from ckptflow.lease import lease_holder_id
    from ckptflow.pipeline import export_run, run_lease
    from ckptflow.quiet import quiet_libraries
    from ckptflow.runs import get_run, run_settings

    quiet_libraries()
    ledger = _ledger(settings)
    try:
        recorded = run_settings(get_run(ledger, run_name))
    finally:
        ledger.close()
    recorded = recorded.model_copy(update={"home": settings.home, "ledger_url": settings.ledger_url})
    with run_lease(recorded, run_name, lease_holder_id()):  # never beside a live training run of `run_name`
        result = export_run(
            recorded, run_name, step=step, out=out_dir, merge=False if no_merge else None, force=force
        )
    if as_json:
        _emit_json(result)
        return
    out.print(f"exported checkpoint-{result['step']} of {run_name} to {result['path']}", highlight=False)


@app.command()
def serve() -> None:
    """Serve the finetune and retrain deployments (flow.serve, no work pool needed)."""
    from deployments.serve import main as serve_main

    serve_main()


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    table = Table(*columns)
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    out.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def main() -> None:
    from ckptflow.secrets import install_redaction

    install_redaction()  # credentials in the environment (ledger URL, cloud keys) never reach a log line
    app()


if __name__ == "__main__":
    main()
