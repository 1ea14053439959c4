"""Publish what a run looks like to the Prefect UI: checkpoint table, summary with loss curve,
progress as chunks finish, and the explanation of a retrain decision.

Every artifact gets an explicit key (stable per run): the UI then shows the history of
each one, and `prefect artifact ls` works (it fails on key-less artifacts).

Artifacts are a view of the run, not the run: a failure to publish one (API down, a bug in a
report) is logged and never replaces the run's real error or fails a completed run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
import threading
from typing import Any, TypeVar
from uuid import UUID

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE

from ckptflow import reports
from ckptflow.ledger import Ledger
from ckptflow.promotion import DecisionRecord
from ckptflow.settings import Settings

# Artifact kinds (the suffix of each key).
CHECKPOINTS, SUMMARY, PROGRESS, DECISION = "checkpoints", "summary", "progress", "decision"
# Key of the retrain decision artifact: one history of decisions, whatever the challenger's name.
RETRAIN_DECISION_KEY = reports.artifact_key("retrain", DECISION)

T = TypeVar("T")
log = logging.getLogger(__name__)


def publish_quietly(publish: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """`publish(*args, **kwargs)`; on failure log a warning and return None instead of raising."""
    try:
        return publish(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of a view must not change the run's outcome
        log.warning("could not publish Prefect artifacts (%s: %s); the run is not affected", type(exc).__name__, exc)
        return None


@task(name="publish_artifacts", cache_policy=NO_CACHE)
def publish_run_artifacts(settings: Settings, run_name: str) -> dict[str, str]:
    """Checkpoint table and summary (loss curve inlined); returns the artifact keys."""
    ledger = Ledger(settings.ledger, home=settings.home)
    try:
        rows = reports.checkpoint_rows(ledger, run_name)
        curve = reports.loss_curve_svg(
            reports.training_log(ledger, run_name), settings.run_dir(run_name) / reports.LOSS_CURVE_SVG, run_name
        )
        summary = reports.summary_markdown(ledger, run_name, curve)
    finally:
        ledger.close()
    keys = {
        CHECKPOINTS: reports.artifact_key(run_name, CHECKPOINTS),
        SUMMARY: reports.artifact_key(run_name, SUMMARY),
    }
    create_table_artifact(
        rows, key=keys[CHECKPOINTS], description=f"Checkpoints of run {run_name}: kept or pruned, and why"
    )
    create_markdown_artifact(summary, key=keys[SUMMARY], description=f"Summary of run {run_name}")
    return keys


class RunProgress:
    """A progress artifact for one run (percent of optimizer steps), moved forward at every committed save.

    Created on first use, not when constructed: the live watcher (tasks/live.py) publishes it from its
    thread, so the flow's thread makes no API call for it. Never moves back.
    """

    def __init__(self, run_name: str, total_steps: int, done_steps: int = 0) -> None:
        self.run_name = run_name
        self.key = reports.artifact_key(run_name, PROGRESS)
        self.total_steps = max(1, total_steps)
        self.done_steps = done_steps
        self.artifact_id: UUID | None = None
        self._tried = False  # one creation attempt: an unreachable API warns once, not at every save
        self._lock = threading.Lock()

    def _percent(self, step: int) -> float:
        return round(100.0 * min(step, self.total_steps) / self.total_steps, 1)

    def publish(self) -> None:
        """Create the artifact at the current percent (once; later calls do nothing)."""
        with self._lock:
            self._create()

    def _create(self) -> None:
        if self._tried:
            return
        self._tried = True
        self.artifact_id = publish_quietly(
            create_progress_artifact,
            self._percent(self.done_steps),
            key=self.key,
            description=f"Training progress of run {self.run_name}",
        )

    def reached(self, step: int) -> None:
        with self._lock:
            if step <= self.done_steps:
                return
            self.done_steps = step
            if not self._tried:  # created at this step's percent: no update needed
                self._create()
            elif self.artifact_id is not None:
                publish_quietly(update_progress_artifact, self.artifact_id, self._percent(step))


def publish_decision(record: DecisionRecord) -> str:
    """The retrain decision as markdown; returns its key."""
    create_markdown_artifact(
        reports.decision_markdown(record.to_json()),
        key=RETRAIN_DECISION_KEY,
        description=f"Retrain decision: {record.action}",
    )
    return RETRAIN_DECISION_KEY
