"""Tasks of the finetune flow. Each calls one library function; Prefect adds retries, names, caching."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import get_run_context

from ckptflow import pipeline
from ckptflow.chunks import ChunkJob, ChunkResult, lease_holder_id, run_chunk
from ckptflow.launchers import launcher
from ckptflow.planning import Chunk
from ckptflow.runs import OpenedRun
from ckptflow.settings import Settings


@task(name="prepare_data", cache_policy=NO_CACHE)
def prepare_data(settings: Settings) -> pipeline.PreparedInfo:
    return pipeline.prepare(settings)


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
    job = ChunkJob(
        ledger_url=settings.ledger,
        run_name=run_name,
        chunk=chunk.index,
        start_step=chunk.start_step,
        end_step=chunk.end_step,
        settings=settings.to_json(),
        lease_holder=lease_holder_id(),
        prefect_flow_run_id=flow_run_id,
        prefect_task_run_id=task_run_id,
    )
    return run_chunk(job, launcher(settings.train.launcher))


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(settings: Settings, run_name: str) -> dict[str, Any]:
    return pipeline.evaluate_run(settings, run_name)


@task(name="export_best", cache_policy=NO_CACHE)
def export_best(settings: Settings, run_name: str) -> dict[str, Any]:
    return pipeline.export_run(settings, run_name)
