"""Tasks of the retrain flow: find the champion, judge the challenger, record the decision."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from ckptflow import promotion
from ckptflow.ledger import Ledger
from ckptflow.settings import Settings


@task(name="find_champion", cache_policy=NO_CACHE)
def find_champion(settings: Settings) -> promotion.Champion | None:
    with Ledger(settings.ledger, home=settings.home) as ledger:
        return promotion.current_champion(ledger)


@task(name="judge_challenger", cache_policy=NO_CACHE)
def judge_challenger(
    settings: Settings, challenger: dict[str, Any], champion: promotion.Champion | None, data_fingerprint: str
) -> promotion.DecisionRecord:
    """Evaluate both exports on the challenger's eval set and decide."""
    return promotion.judge(settings, challenger, champion, data_fingerprint)


@task(name="record_decision", cache_policy=NO_CACHE)
def record_decision(
    settings: Settings, record: promotion.DecisionRecord, challenger_export_id: int | None = None
) -> promotion.DecisionRecord:
    """Ledger `exports.promoted`, exports/champion.json and the decision log."""
    with Ledger(settings.ledger, home=settings.home) as ledger:
        return promotion.record_decision(ledger, settings.home, record, challenger_export_id)


@task(name="prune_exports", cache_policy=NO_CACHE)
def prune_exports(settings: Settings) -> dict[str, dict[int, str]]:
    """Keep the champion, the previous one and the last `export.keep_challengers` challengers; prune the rest."""
    from ckptflow.export_retention import prune_exports as prune

    with Ledger(settings.ledger, home=settings.home) as ledger:
        decision = prune(
            ledger, settings.home, settings.export.keep_challengers, remote_url=settings.checkpoint.remote_url or None
        )
    return {"keep": decision.keep, "prune": decision.prune}
