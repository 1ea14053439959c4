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
from typing import TYPE_CHECKING, Annotated, Any

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

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ckptflow.errors import BadInputError, CkptflowError
from ckptflow.paths import validate_run_name
from ckptflow.settings import Settings, load_settings

if TYPE_CHECKING:
    from flows.temporary_server import TemporaryServer

# Plain click help: flags show as flags (rich help printed `--json <bool>`), arguments are described.
app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None, help="Crash-safe, policy-driven LoRA fine-tuning."
)
# Not a terminal (a pipe, a file, CI): never wrap a line mid-phrase, never truncate a value.
err = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
out = Console(soft_wrap=not sys.stdout.isatty())

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

# Set once a command has loaded the training stack for work of its own (training, an export): main() then
# ends the process with fast_exit.exit_now, skipping seconds of interpreter teardown. Answers exit normally.
_exit_fast = False

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML settings file.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (logs stay on stderr).")]
RunArg = Annotated[str, typer.Argument(metavar="RUN", help="Run name, as `ckptflow runs` lists it.")]


def _exits(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map every error to an exit code with a readable message on stderr; never a traceback."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except BadInputError as exc:
            _say("error", str(exc))
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except CkptflowError as exc:
            _say("failed", str(exc))
            raise typer.Exit(EXIT_FAILED) from None
        except Exception as exc:  # anything a library raised: still a message, not a traceback
            code, message = _unexpected(exc)
            _say("error" if code == EXIT_BAD_INPUT else "failed", message)
            raise typer.Exit(code) from None

    return wrapper


def _say(label: str, message: str) -> None:
    """One error message on stderr: secrets masked (a library may quote a URL), markup escaped (a name may hold [ ])."""
    from ckptflow.secrets import redact

    err.print(f"[bold red]{label}:[/] {escape(redact(message))}", markup=True, highlight=False)


def _unexpected(exc: Exception) -> tuple[int, str]:
    """(exit code, message) for an exception ckptflow did not raise itself."""
    import errno

    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        where = exc.filename or "a file"
        return EXIT_BAD_INPUT, (
            f"cannot write {where} ({exc.strerror}): make CKPTFLOW_HOME (and CKPTFLOW_LEDGER_URL's directory) "
            "writable, or set CKPTFLOW_HOME to a writable directory"
        )
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return EXIT_FAILED, f"disk full writing {exc.filename or 'a file'}: free space and run the command again"
    module = type(exc).__module__ or ""
    if module.startswith("sqlalchemy") or module.startswith("sqlite3"):
        return EXIT_BAD_INPUT, f"the ledger cannot be used ({type(exc).__name__}: {text[:300]}): check CKPTFLOW_LEDGER_URL"
    return EXIT_FAILED, f"{type(exc).__name__}: {text[:500]} (unexpected; please report it with the command you ran)"


def _emit_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


def _plain(value: Any) -> Any:
    """Dataclasses (chunk results, records) as dicts, recursively, for --json."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _settings(config: Path | None) -> Settings:
    settings = load_settings(config)
    return settings.model_copy(update={"home": settings.home.resolve()})


def _ledger(settings: Settings, run_name: str | None = None):
    """The ledger for a command that writes: checked first; no runs yet is RunNotFoundError, not a new file."""
    from ckptflow import preflight
    from ckptflow.errors import RunNotFoundError
    from ckptflow.ledger import Ledger

    preflight.check_home(settings.home, writable=True)
    if not preflight.ledger_exists(settings):
        if run_name is not None:
            raise _no_runs(run_name, settings)
        raise RunNotFoundError(f"no runs yet: {settings.ledger_shown} does not exist; `ckptflow run` creates it")
    preflight.check_ledger(settings.ledger)
    return Ledger(settings.ledger, home=settings.home)


def _readonly_ledger(settings: Settings):
    """The ledger opened read-only (None: no runs recorded yet); creates and migrates nothing."""
    from ckptflow.preflight import open_readonly_ledger

    return open_readonly_ledger(settings)


def _no_runs(run_name: str, settings: Settings) -> BadInputError:
    from ckptflow.errors import RunNotFoundError

    return RunNotFoundError(
        f"no run named {run_name!r}: no runs yet in {settings.home} (no ledger); `ckptflow runs` lists runs"
    )


@app.command()
@_exits
def run(
    config: ConfigOpt = None,
    run_name: Annotated[str | None, typer.Option("--run-name", "-n", help="Run to create or resume.")] = None,
    new: Annotated[bool, typer.Option("--new", help="Start a fresh run even if the name exists.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the finetune flow; resumes run NAME if it exists and is unfinished."""
    err.print("ckptflow run: checking settings, data and model …", highlight=False)  # at once: imports come later
    if run_name is not None:
        validate_run_name(run_name, suffix="-2" if new else "")  # before anything is read or started
    from ckptflow import preflight

    settings = _settings(config)
    preflight.check_cheap(settings)  # settings, home, ledger, data rows, config.json, memory: before any heavy import
    for warning in settings.warnings():
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    completed = preflight.completed_run(settings, run_name, new)  # about as fast as --help: no torch, no Prefect
    if completed is not None:
        _report_run({"run": completed, "status": "completed", "already_completed": True}, as_json)
        return
    from ckptflow.quiet import quiet_libraries

    quiet_libraries()  # imports transformers and datasets
    completed = preflight.check_resume(settings, run_name, new)  # exit 2 before Prefect; a finished run answers
    if completed is not None:
        _report_run({"run": completed, "status": "completed", "already_completed": True}, as_json)
        return
    _prewarm_server()
    preflight.check_model(settings)  # transformers can build the model, LoRA targets exist
    from ckptflow.planner import plan_for_settings

    for warning in plan_for_settings(settings).warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    err.print("ckptflow run: starting Prefect and the finetune flow …", highlight=False)
    server = _training_starts()
    from flows.finetune import finetune

    _server_ready(server)
    try:
        result = finetune(run_name=run_name, new=new, config_file=str(config) if config else None)
    except (BadInputError, CkptflowError):
        raise
    except Exception as exc:  # a chunk that failed all its retries, an export check, ...
        _say("failed", f"{type(exc).__name__}: {exc}")
        err.print("run it again to resume from the last committed checkpoint", highlight=False)
        raise typer.Exit(EXIT_FAILED) from None
    _report_run(result, as_json)


def _prewarm_server() -> None:
    """Let Prefect's temporary server import itself in another process while the model is checked (no Prefect here yet)."""
    from flows.temporary_server import prewarm

    prewarm()


def _training_starts() -> TemporaryServer | None:
    """From here on the command trains: start Prefect's temporary server (None: an API URL is set) to boot meanwhile."""
    global _exit_fast
    _exit_fast = True
    from flows.temporary_server import start

    return start()


def _server_ready(server: TemporaryServer | None) -> None:
    """Before the flow's first API call: what training imports is imported (meanwhile a temporary server boots in
    its own process); the temporary server answers."""
    from ckptflow.preload import import_training_modules

    import_training_modules()  # here, not inside the flow's first chunk, where Prefect's threads share the GIL
    if server is not None:
        server.wait()


def _report_run(result: dict[str, Any], as_json: bool) -> None:
    """The run's outcome: one JSON document on stdout with --json, else a short summary on stderr."""
    if as_json:
        _emit_json(_plain(result))
        return
    if result.get("already_completed"):
        name = result["run"]
        err.print(f"run {name} already completed; `ckptflow checkpoints {name}` shows it, --new trains again", highlight=False)
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
    from ckptflow.precision import check_supported
    from ckptflow.preflight import check_finite

    settings = _settings(config)
    check_finite(settings)
    document = plan_for_settings(settings, at_step=at).to_json()
    document["precision"] = settings.train.precision  # `auto` resolved on this machine, as a run would train
    check_supported(document["precision"])
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
    out.print(f"precision        {p['precision']}", highlight=False)
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

    settings = _settings(config)
    ledger = _readonly_ledger(settings)
    if ledger is None:
        rows = []
    else:
        try:
            rows = runs_view(ledger)
        finally:
            ledger.close()
    if not rows and not as_json:
        err.print(f"no runs yet in {settings.ledger_shown}; `ckptflow run` starts one", highlight=False)
        return
    if as_json:
        _emit_json(rows)
        return
    _table(rows, ["name", "status", "last_step", "total_steps", "best_step", "best_metric", "updated_at"])


@app.command()
@_exits
def checkpoints(
    run_name: RunArg,
    all_states: Annotated[bool, typer.Option("--all", help="Include pruned, corrupt and partial ones.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Committed (or all) checkpoints of a run."""
    validate_run_name(run_name, option="the RUN argument")
    from ckptflow.views import checkpoints_view

    settings = _settings(config)
    ledger = _readonly_ledger(settings)
    if ledger is None:
        raise _no_runs(run_name, settings)
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
def verify(run_name: RunArg, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Re-hash every committed checkpoint and look for partial ones; exit 1 when any file differs or is missing."""
    validate_run_name(run_name, option="the RUN argument")
    from ckptflow.recovery import verify_run
    from ckptflow.runs import get_run

    settings = _settings(config)
    ledger = _readonly_ledger(settings)
    if ledger is None:
        raise _no_runs(run_name, settings)
    try:
        run_record = get_run(ledger, run_name)
        with _busy(f"re-hashing the checkpoints of {run_name} …"):
            problems = verify_run(
                ledger, run_record.id, settings.checkpoints_dir(run_name), remote_url=settings.checkpoint.remote_url
            )
        checked = [c.step for c in ledger.checkpoints(run_record.id, states=["committed"])]
    finally:
        ledger.close()
    document = {"run": run_name, "checked": checked, "ok": not problems, "problems": {str(k): v for k, v in problems.items()}}
    if as_json:
        _emit_json(document)
    elif problems:
        for _step, items in sorted(problems.items()):
            for item in items:  # each names its file: checkpoint-N/<file>: what is wrong
                err.print(escape(item), highlight=False)
        steps = ", ".join(f"checkpoint-{step}" for step in sorted(problems))
        err.print(
            f"run {run_name}: {len(checked) - len(set(problems) & set(checked))} of {len(checked)} committed checkpoints "
            f"verified; not usable: {steps} (resume and export skip them and fall back to the next that verifies)",
            highlight=False,
        )
    else:
        out.print(f"{len(checked)} committed checkpoints verified: {checked}")
    if problems:
        raise typer.Exit(EXIT_FAILED)


@app.command()
@_exits
def prune(
    run_name: RunArg,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the decision; change nothing.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply the retention policy now (the run's recorded policy, or --config's)."""
    validate_run_name(run_name, option="the RUN argument")
    from ckptflow.retention import apply_retention
    from ckptflow.runs import get_run, run_settings

    settings = _settings(config)
    ledger = _readonly_ledger(settings) if dry_run else _ledger(settings, run_name)
    if ledger is None:
        raise _no_runs(run_name, settings)
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
    run_name: RunArg,
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
    global _exit_fast
    _exit_fast = True  # loads torch and the model: skip their teardown at exit
    from ckptflow.lease import lease_holder_id
    from ckptflow.pipeline import export_run, run_lease
    from ckptflow.quiet import quiet_libraries
    from ckptflow.runs import get_run, run_settings

    quiet_libraries()
    ledger = _ledger(settings)
    try:
        run_record = get_run(ledger, run_name)
        if step is not None and not _committed(ledger.get_checkpoint(run_record.id, step)):  # before the lease
            raise BadInputError(
                f"run {run_name!r} has no committed checkpoint at step {step}; `ckptflow checkpoints {run_name}` lists them"
            )
        recorded = run_settings(run_record)
    finally:
        ledger.close()
    recorded = recorded.model_copy(update={"home": settings.home, "ledger_url": settings.ledger_url})
    with run_lease(recorded, run_name, lease_holder_id()), _busy("exporting (merge, write, reload check) …"):
        result = export_run(
            recorded, run_name, step=step, out=out_dir, merge=False if no_merge else None, force=force
        )
    if as_json:
        _emit_json(result)
        return
    out.print(f"exported checkpoint-{result['step']} of {run_name} to {result['path']}", highlight=False)


@app.command()
@_exits
def retrain(
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Train a challenger even when the data did not change.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run the retrain flow here (the same flow as the nightly deployment): challenger vs champion, promote or keep."""
    err.print("ckptflow retrain: checking settings …", highlight=False)
    from ckptflow import preflight

    settings = _settings(config)
    preflight.check_cheap(settings)
    from ckptflow.quiet import quiet_libraries

    quiet_libraries()
    _prewarm_server()
    preflight.check_model(settings)
    err.print("ckptflow retrain: starting Prefect and the retrain flow …", highlight=False)
    server = _training_starts()
    from flows.retrain import retrain as retrain_flow

    _server_ready(server)
    state = retrain_flow(config_file=str(config) if config else None, force=force, return_state=True)
    if not state.is_completed():
        raise CkptflowError(f"retrain ended {state.name}: {state.message or ''}".strip())
    record = state.result()
    if as_json:
        _emit_json(_plain(record))
        return
    err.print(f"retrain: {record['action']} — {record['reason']}", highlight=False)


@app.command()
@_exits
def rollback(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Make the previous champion of `retrain` the champion again (ledger, exports/champion.json, the symlink)."""
    from ckptflow.promotion import rollback as roll_back

    settings = _settings(config)
    ledger = _ledger(settings)
    try:
        record = roll_back(ledger, settings.home)
    finally:
        ledger.close()
    if as_json:
        _emit_json(record.to_json())
        return
    err.print(f"rollback: {record.reason}", highlight=False)


@app.command()
@_exits
def serve() -> None:
    """Serve the finetune and retrain deployments (flow.serve, no work pool needed)."""
    from deployments.serve import main as serve_main

    global _exit_fast
    _exit_fast = True  # a stop (SIGTERM) skips the interpreter teardown of what serving loaded
    serve_main()


def _table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    """A rich table on a terminal (values fold, never truncated); tab-separated lines in a pipe: copyable, greppable."""
    if not out.is_terminal:
        sys.stdout.write("\t".join(columns) + "\n")
        for row in rows:
            sys.stdout.write("\t".join(_cell(row.get(c)) for c in columns) + "\n")
        return
    table = Table(*columns)
    for column in table.columns:
        column.overflow = "fold"
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    out.print(table)


def _committed(checkpoint: Any) -> bool:
    from ckptflow.ledger import CheckpointState

    return checkpoint is not None and checkpoint.state == CheckpointState.COMMITTED


def _busy(message: str):
    """A spinner on stderr while a long operation runs (a terminal only; pipes get nothing)."""
    from contextlib import nullcontext

    return err.status(message) if err.is_terminal else nullcontext()


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def main() -> None:
    from ckptflow.secrets import install_redaction

    install_redaction()  # credentials in the environment (ledger URL, cloud keys) never reach a log line
    try:
        app()
    except SystemExit as exc:
        if not _exit_fast:
            raise
        from ckptflow.fast_exit import exit_now

        exit_now(exc.code)


if __name__ == "__main__":
    main()
