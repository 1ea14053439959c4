"""Publish a run's artifacts to the Prefect UI: checkpoint table, summary, loss curve."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from ckptflow import reports
from ckptflow.ledger import Ledger
from ckptflow.settings import Settings


@task(name="publish_artifacts", cache_policy=NO_CACHE)
def publish_run_artifacts(settings: Settings, run_name: str) -> dict[str, str]:
    """Keys are stable per run, so the UI shows the latest version of each artifact."""
    ledger = Ledger(settings.ledger)
    try:
        rows = reports.checkpoint_rows(ledger, run_name)
        png = reports.loss_curve_png(
            reports.training_log(ledger, run_name), settings.run_dir(run_name) / reports.LOSS_CURVE_PNG, run_name
        )
        summary = reports.summary_markdown(ledger, run_name, png)
    finally:
        ledger.close()
    keys = {
        "checkpoints": reports.artifact_key(run_name, "checkpoints"),
        "summary": reports.artifact_key(run_name, "summary"),
    }
    create_table_artifact(rows, key=keys["checkpoints"], description=f"Checkpoints of run {run_name}")
    create_markdown_artifact(summary, key=keys["summary"], description=f"Summary of run {run_name}")
    return keys
