"""Flow `retrain` (scheduled): prepare data → skip if the champion saw this data → finetune a challenger
→ evaluate challenger and champion on the same eval set → promote if better by the margin → record."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Completed, State

from ckptflow import promotion
from ckptflow.params import FinetuneOverrides
from ckptflow.quiet import quiet_libraries
from ckptflow.secrets import install_redaction
from flows.finetune import SKIPPED, finetune, resolve_settings
from tasks.pipeline import prepare_data
from tasks.promotion import find_champion, judge_challenger, prune_exports, record_decision
from tasks.reporting import publish_decision, publish_quietly


@flow(name="retrain")
def retrain(
    config_file: str | None = None,
    overrides: FinetuneOverrides | None = None,
    force: bool = False,
) -> State:
    """Retrain on the configured data and promote the challenger only if it beats the champion.

    Finishes `Completed` in every case; the state message says what happened (promoted,
    champion kept, or "skipped: no new data"), and the `retrain-decision` artifact explains why.

    Args:
        config_file: TOML settings file, relative to the working directory (the repository in deployments).
        overrides: Settings to change for this run; empty fields keep the config file / environment / defaults.
        force: Train a challenger even when the champion was trained on exactly this data.
    """
    quiet_libraries()
    logger = get_run_logger()
    settings = resolve_settings(config_file, overrides)
    install_redaction([settings.ledger])  # now that Prefect's log handlers exist: mask secrets in every record
    prepared = prepare_data(settings)(settings)
    champion = find_champion(settings)
    margin = settings.export.promotion_margin
    skip = promotion.decide_skip(prepared.data_fingerprint, champion, force=force)
    if skip is not None:
        record = record_decision(settings, promotion.skip_record(skip, champion, prepared.data_fingerprint, margin))
        return _finish(record, logger, name=SKIPPED)
    challenger = promotion.challenger_name(datetime.now(UTC))
    trained = finetune.with_options(flow_run_name=f"finetune {challenger}")(
        run_name=challenger, new=True, config_file=config_file, overrides=overrides
    )
    export = trained["export"]
    candidate = {"run": trained["run"], **{k: export[k] for k in ("path", "step", "export_id")}}
    record = judge_challenger(settings, candidate, champion, prepared.data_fingerprint)
    record = record_decision(settings, record, export["export_id"])
    prune_exports(settings)  # champion + previous + the last export.keep_challengers challengers stay
    return _finish(record, logger)


def _finish(record: promotion.DecisionRecord, logger: Any, name: str = "Completed") -> State:
    """Publish the decision and end the flow run with it as the state message."""
    publish_quietly(publish_decision, record)
    logger.info("retrain: %s — %s", record.action, record.reason)
    message = record.reason if record.action == "skip" else f"{record.action}: {record.reason}"
    return Completed(name=name, message=message, data=record.to_json())
