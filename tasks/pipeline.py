"""Tasks of the finetune flow. Each calls one library function; Prefect adds retries, names, caching."""

from __future__ import annotations

from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext, get_run_context

from ckptflow import pipeline
from ckptflow.chunks import ChunkJob, ChunkResult, lease_holder_id, run_chunk
from ckptflow.launchers import launcher
from ckptflow.planning import Chunk
from ckptflow.runs import OpenedRun
from ckptflow.settings import Settings
from tasks.step_lines import batched_step_lines, plain_console_step_lines

# Under $CKPTFLOW_HOME: Prefect's persisted task results (the prepare_data cache).
PREFECT_RESULTS_DIR = "prefect-results"


def _prepare_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str | None:
    """The digest of prepare_data's inputs (data bytes, tokenizer, formatting); computing it tokenizes nothing.

    None (no caching) when the inputs cannot be read: the task then runs and raises the real error.
    """
    try:
        return "prepare-data-" + pipeline.prepare_key(parameters["settings"])
    except Exception:  # noqa: BLE001 - the task body reports it properly
        return None


@task(name="prepare_data", cache_key_fn=_prepare_cache_key, persist_result=True, result_serializer="pickle")
def _prepare_data(settings: Settings) -> pipeline.PreparedInfo:
    return pipeline.prepare(settings)


def prepare_data(settings: Settings) -> Task[..., pipeline.PreparedInfo]:
    """The prepare_data task with its cache under this run's $CKPTFLOW_HOME (a rerun with the same data is `Cached`)."""
    return _prepare_data.with_options(result_storage=pipeline.prefect_results_dir(settings))


@task(name="open_run", cache_policy=NO_CACHE)
def open_run(settings: Settings, prepared: pipeline.PreparedInfo, run_name: str | None, new: bool) -> OpenedRun:
    return pipeline.open_or_create_run(settings, prepared, run_name, new)


def _prefect_ids() -> tuple[str | None, str | None]:
    ctx = get_run_context()
    task_run = getattr(ctx, "task_run", None)
    flow_run_id = getattr(task_run, "flow_run_id", None)
    return (str(flow_run_id) if flow_run_id else None, str(task_run.id) if task_run else None)


@task(name="train_chunk", cache_policy=NO_CACHE)
def train_chunk(settings: Settings, run_name: str, chunk: Chunk) -> ChunkResult:
    """Train one chunk; every retry resumes from the ledger's newest verified checkpoint."""
    flow_run_id, task_run_id = _prefect_ids()
    job = ChunkJob.for_chunk(
        settings,
        run_name,
        chunk,
        lease_holder=lease_holder_id(),
        prefect_flow_run_id=flow_run_id,
        prefect_task_run_id=task_run_id,
    )
    # Step lines: one API record per batch interval, not per step; plain text to a console that is no terminal.
    with batched_step_lines((flow_run_id, task_run_id)), plain_console_step_lines():
        return run_chunk(job, launcher(settings.train.launcher))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(settings: Settings, run_name: str) -> dict[str, Any]:
    return pipeline.evaluate_run(settings, run_name)


@task(name="export_best", cache_policy=NO_CACHE)
def export_best(settings: Settings, run_name: str) -> dict[str, Any]:
    return pipeline.export_run(settings, run_name)
