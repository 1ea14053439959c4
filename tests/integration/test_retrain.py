"""The retrain flow for real (Prefect test harness, tiny model): promote the first challenger,
keep the champion when a challenger on new data is not better by the margin, skip unchanged data."""

from __future__ import annotations

import json

import pytest

from ckptflow.builtin import DEMO_TRAIN
from ckptflow.ledger import Ledger
from ckptflow.promotion import CHAMPION_FILE, DECISIONS_FILE, SKIPPED_NO_NEW_DATA, read_pointer

from tests.helpers import settings_for

pytestmark = pytest.mark.slow

FAST = {"train": {"chunk_steps": 4, "retry_delay_seconds": 0}}  # the demo's 4 steps in one chunk


def _decisions(home) -> list[dict]:
    return [json.loads(line) for line in (home / "exports" / DECISIONS_FILE).read_text().splitlines()]


def test_retrain_promotes_keeps_and_skips(home, prefect_harness, tmp_path):
    from flows.retrain import retrain

    # 1. No champion yet: the challenger is trained, exported and promoted.
    first = retrain(overrides=FAST, return_state=True)
    assert first.is_completed() and first.message.startswith("promote")
    champion = read_pointer(home)
    assert champion["run"].startswith("retrain-") and champion["export_id"] == first.result()["challenger"]["export_id"]
    assert (home / "exports" / "champion" / "model.safetensors").is_file()

    # 2. New training data, evaluated on the same eval set; a margin no challenger can meet keeps the champion.
    fresh = tmp_path / "fresh.jsonl"
    fresh.write_text("".join(json.dumps({"text": t.upper()}) + "\n" for t in DEMO_TRAIN))
    new_data = {**FAST, "data": {"train": str(fresh), "eval": "builtin:demo"}, "export": {"promotion_margin": 100.0}}
    second = retrain(overrides=new_data, return_state=True)
    record = second.result()
    assert second.is_completed() and record["action"] == "keep", second.message
    assert set(record["scores"]) == {"champion", "challenger"} and record["eval_rows"] == 2
    assert all(s["eval_loss"] > 0 for s in record["scores"].values())
    assert read_pointer(home) == champion  # unchanged
    assert (home / "exports" / record["challenger"]["run"] / "model.safetensors").is_file()

    # 3. The champion's data again: nothing to train.
    third = retrain(overrides=FAST, return_state=True)
    assert third.is_completed() and third.name == "Skipped" and third.message.startswith(SKIPPED_NO_NEW_DATA)

    assert [d["action"] for d in _decisions(home)] == ["promote", "keep", "skip"]
    settings = settings_for(home)
    with Ledger(settings.ledger) as ledger:
        promoted = [(e.id, e.promoted) for e in ledger.exports()]
        runs = sorted(r.name for r in ledger.list_runs())
    assert promoted == [(champion["export_id"], True), (record["challenger"]["export_id"], False)]
    assert len(runs) == 2  # the skip trained nothing
    assert (home / "exports" / CHAMPION_FILE).is_file()
