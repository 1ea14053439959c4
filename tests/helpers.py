"""Shared test helpers: run the pipeline's library steps without Prefect, read adapter weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ckptflow import pipeline
from ckptflow.chunks import ChunkJob, run_chunk
from ckptflow.ledger import CheckpointState, Ledger, RunStatus
from ckptflow.planning import schedule_for
from ckptflow.settings import Settings, load_settings

ADAPTER_FILE = "adapter_model.safetensors"


def settings_for(home: Path, **overrides: Any) -> Settings:
    settings = load_settings(**overrides)
    return settings.model_copy(update={"home": home.resolve()})


def job_for(settings: Settings, run_name: str, chunk) -> ChunkJob:
    return ChunkJob.for_chunk(settings, run_name, chunk)


def train_without_prefect(settings: Settings, run_name: str, *, launch=None) -> str:
    """prepare → open → every chunk once (no retries); returns the run name."""
    prepared = pipeline.prepare(settings)
    opened = pipeline.open_or_create_run(settings, prepared, run_name, False)
    for chunk in schedule_for(settings, total_steps=opened.run.total_steps, train_rows=prepared.train_rows).chunks:
        run_chunk(job_for(settings, opened.run.name, chunk), launch)
    return opened.run.name


def finish_without_prefect(settings: Settings, run_name: str) -> dict[str, Any]:
    evaluation = pipeline.evaluate_run(settings, run_name)
    exported = pipeline.export_run(settings, run_name)
    pipeline.set_status(settings, run_name, RunStatus.COMPLETED)
    return {"evaluation": evaluation, "export": exported}


def committed_steps(settings: Settings, run_name: str) -> list[int]:
    ledger = Ledger(settings.ledger)
    try:
        run = ledger.get_run(run_name)
        return [c.step for c in ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED])]
    finally:
        ledger.close()


def checkpoint_dirs_on_disk(settings: Settings, run_name: str) -> list[int]:
    root = settings.checkpoints_dir(run_name)
    return sorted(int(p.name.split("-")[1]) for p in root.glob("checkpoint-*") if p.is_dir())


def adapter_weights(checkpoint: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / ADAPTER_FILE))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), f"different tensors: {sorted(a.keys() ^ b.keys())}"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
