"""Flow `finetune`: prepare data → open run → train chunks (retried, resumed) → evaluate → export → artifacts."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from prefect import State, flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.states import Completed

from ckptflow import pipeline
from ckptflow.chunks import lease_holder_id
from ckptflow.errors import BadInputError, InsufficientDiskError, RunLockedError
from ckptflow.ledger import RunStatus
from ckptflow.params import FinetuneOverrides, RunName, settings_overrides
from ckptflow.planning import schedule_for
from ckptflow.quiet import quiet_libraries
from ckptflow.secrets import install_redaction
from ckptflow.settings import Settings, load_settings
from tasks.pipeline import evaluate, export_best, open_run, prepare_data, train_chunk
from tasks.live import LiveSummary, LiveUpdates, live_updates, newest_committed_step
from tasks.reporting import RunProgress, publish_quietly, publish_run_artifacts

# State name (a Completed type) of a flow run that had nothing to do: a duplicate submission (the lease holder
# trains the run) or a retrain without new data.
SKIPPED = "Skipped"


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry crashes; not input the user must fix, nor a full disk (retrying can't help)."""
    try:
        state.result()
    except (BadInputError, InsufficientDiskError):
        return False
    except Exception:
        return True
    return True


def resolve_settings(config_file: str | None, overrides: FinetuneOverrides | dict[str, Any] | None) -> Settings:
    settings = load_settings(config_file, **settings_overrides(overrides))
    return settings.model_copy(update={"home": settings.home.resolve()})


def train_all_chunks(
    settings: Settings, run_name: str, total_steps: int, train_rows: int, live: LiveUpdates | None = None
) -> list:
    results = []
    chunks = schedule_for(settings, total_steps=total_steps, train_rows=train_rows).chunks  # as `ckptflow plan`
    for chunk in chunks:
        task = train_chunk.with_options(
            retries=settings.train.retries,
            retry_delay_seconds=settings.train.retry_delay_seconds,
            retry_condition_fn=_retry_unless_bad_input,
            task_run_name=f"train_chunk[{chunk.index}] steps {chunk.start_step}-{chunk.end_step}",
        )
        results.append(task(settings, run_name, chunk))
        if live is not None and chunk is not chunks[-1]:  # the last one's summary is the flow's final publish
            live.chunk_ended()  # the watcher shows it now, on its own thread: no API call on this one
    return results


def _steps_done(settings: Settings, run_name: str) -> int:
    from ckptflow.ledger import Ledger

    with Ledger(settings.ledger, home=settings.home) as ledger:
        return newest_committed_step(ledger, run_name)


@flow(name="finetune")
def finetune(
    run_name: RunName | None = None,
    new: bool = False,
    config_file: str | None = None,
    overrides: FinetuneOverrides | None = None,
) -> dict[str, Any]:
    """Fine-tune with LoRA, in chunks that resume from the ledger's newest verified checkpoint.

    Returns the run summary: run name, chunk results, evaluation and export.

    Args:
        run_name: Run to create or resume; empty = named after the settings and data, so the same inputs resume.
        new: Start a fresh run (`<name>-2`, ...) even if a run of this name exists.
        config_file: TOML settings file, relative to the working directory (the repository in deployments).
        overrides: Settings to change for this run; empty fields keep the config file / environment / defaults.
    """
    quiet_libraries()
    settings = resolve_settings(config_file, overrides)
    install_redaction([settings.ledger])  # now that Prefect's log handlers exist: mask secrets in every record
    prepared = prepare_data(settings)(settings)
    opened = open_run(settings, prepared, run_name, new)
    name = opened.run.name
    if opened.completed:
        return _already_completed(name)
    with ExitStack() as leased:
        try:
            run = leased.enter_context(pipeline.run_lease(settings, name, lease_holder_id()))
        except RunLockedError as exc:  # another flow run or process trains it now: never two writers
            if not _deployment_run():
                raise  # `ckptflow run` (or a subflow): the caller reports it (exit 2)
            return _skip_duplicate(name, exc)
        if run.status == RunStatus.COMPLETED:  # its previous holder finished it after open_run read it
            return _already_completed(name)
        return _train_evaluate_export(settings, name, opened.run.total_steps, prepared.train_rows)


def _train_evaluate_export(settings: Settings, name: str, total_steps: int, train_rows: int) -> dict[str, Any]:
    """The run's remaining chunks, evaluation and export, under its lease; the run is marked failed if any fails."""
    result: dict[str, Any] = {"run": name}
    try:
        done = _steps_done(settings, name)
        summary = LiveSummary(settings, name, RunProgress(name, total_steps, done))
        with live_updates(settings, name, summary, start_step=done) as live:
            result["chunks"] = train_all_chunks(settings, name, total_steps, train_rows, live)
        result["evaluation"] = evaluate(settings, name)
        result["export"] = export_best(settings, name)
        pipeline.set_status(settings, name, RunStatus.COMPLETED)
        result["status"] = "completed"
    except BaseException:
        _mark_failed(settings, name)
        raise
    finally:
        publish_quietly(publish_run_artifacts, settings, name)
    return result


def _already_completed(name: str) -> dict[str, Any]:
    get_run_logger().info("run %s already completed; pass new=True (--new) to train again", name)
    return {"run": name, "status": "completed", "already_completed": True}


def _deployment_run() -> bool:
    """Whether this flow run was submitted to a deployment (a worker or `ckptflow serve` runs it)."""
    context = FlowRunContext.get()
    return context is not None and context.flow_run is not None and context.flow_run.deployment_id is not None


def _skip_duplicate(name: str, refusal: RunLockedError) -> State:
    """End a duplicate submission `Skipped`, with the lease's refusal as its message: nothing failed (the lease
    holder trains the run), so no Failed state and no traceback; the run is never written by two processes."""
    get_run_logger().warning("skipped: %s", refusal)
    return Completed(name=SKIPPED, message=str(refusal), data={"run": name, "status": "skipped", "reason": str(refusal)})


def _mark_failed(settings: Settings, name: str) -> None:
    """Record the failure if we can; never let that replace the error being raised (e.g. a lost lease refuses it)."""
    try:
        pipeline.set_status(settings, name, RunStatus.FAILED)
    except Exception as exc:  # noqa: BLE001
        get_run_logger().warning("could not mark run %s failed (%s: %s)", name, type(exc).__name__, exc)
