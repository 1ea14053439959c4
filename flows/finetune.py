"""Flow `finetune`: prepare data → open run → train chunks (retried, resumed) → evaluate → export → artifacts."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from ckptflow import pipeline
from ckptflow.chunks import lease_holder_id
from ckptflow.errors import BadInputError, InsufficientDiskError
from ckptflow.ledger import RunStatus
from ckptflow.params import FinetuneOverrides, RunName, settings_overrides
from ckptflow.planning import schedule_for
from ckptflow.quiet import quiet_libraries
from ckptflow.secrets import install_redaction
from ckptflow.settings import Settings, load_settings
from tasks.pipeline import evaluate, export_best, open_run, prepare_data, train_chunk
from tasks.live import LiveSummary, live_updates
from tasks.reporting import RunProgress, publish_quietly, publish_run_artifacts


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
    settings: Settings,
    run_name: str,
    total_steps: int,
    train_rows: int,
    progress: RunProgress,
    live: LiveSummary | None = None,
) -> list:
    results = []
    for chunk in schedule_for(settings, total_steps=total_steps, train_rows=train_rows).chunks:  # as `ckptflow plan`
        task = train_chunk.with_options(
            retries=settings.train.retries,
            retry_delay_seconds=settings.train.retry_delay_seconds,
            retry_condition_fn=_retry_unless_bad_input,
            task_run_name=f"train_chunk[{chunk.index}] steps {chunk.start_step}-{chunk.end_step}",
        )
        results.append(task(settings, run_name, chunk))
        progress.reached(chunk.end_step)
        if live is not None:
            live.chunk_ended()
    return results


def _steps_done(settings: Settings, run_name: str) -> int:
    from ckptflow.ledger import CheckpointState, Ledger

    with Ledger(settings.ledger, home=settings.home) as ledger:
        run = ledger.get_run(run_name)
        steps = [c.step for c in ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED])] if run else []
    return max(steps, default=0)


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
    logger = get_run_logger()
    settings = resolve_settings(config_file, overrides)
    install_redaction([settings.ledger])  # now that Prefect's log handlers exist: mask secrets in every record
    prepared = prepare_data(settings)(settings)
    opened = open_run(settings, prepared, run_name, new)
    name = opened.run.name
    if opened.completed:
        logger.info("run %s already completed; pass new=True (--new) to train again", name)
        return {"run": name, "status": "completed", "already_completed": True}
    result: dict[str, Any] = {"run": name}
    with pipeline.run_lease(settings, name, lease_holder_id()):
        try:
            done = _steps_done(settings, name)
            progress = RunProgress(name, opened.run.total_steps, done)
            live = LiveSummary(settings, name, progress)
            with live_updates(settings, name, live.saved, start_step=done):
                total = opened.run.total_steps
                result["chunks"] = train_all_chunks(settings, name, total, prepared.train_rows, progress, live)
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


def _mark_failed(settings: Settings, name: str) -> None:
    """Record the failure if we can; never let that replace the error being raised (e.g. a lost lease refuses it)."""
    try:
        pipeline.set_status(settings, name, RunStatus.FAILED)
    except Exception as exc:  # noqa: BLE001
        get_run_logger().warning("could not mark run %s failed (%s: %s)", name, type(exc).__name__, exc)
