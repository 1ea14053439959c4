"""Champion/challenger: the pure decisions as tables, and recording promotions in a real SQLite ledger."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from ckptflow.ledger import Ledger
from ckptflow.promotion import (
    CHAMPION_FILE,
    CHAMPION_LINK,
    DECISIONS_FILE,
    SKIPPED_NO_NEW_DATA,
    Champion,
    Decision,
    DecisionRecord,
    challenger_name,
    comparable,
    current_champion,
    decide_promotion,
    decide_skip,
    read_pointer,
    record_decision,
    skip_record,
)
from ckptflow.runs import CONFIG_DATA_FINGERPRINT


def _champion(fingerprint: str | None = "fp-a", path: str = "/nowhere", base: str = "builtin:tiny-gpt2") -> Champion:
    return Champion(
        run="retrain-1", export_id=1, path=path, step=4, base_model=base, data_fingerprint=fingerprint, metrics={}
    )


@pytest.mark.parametrize(
    ("fingerprint", "champion", "force", "skips"),
    [
        ("fp-a", None, False, False),  # no champion yet: train
        ("fp-a", _champion("fp-a"), False, True),  # same data: skip
        ("fp-b", _champion("fp-a"), False, False),  # new data: train
        ("fp-a", _champion("fp-a"), True, False),  # forced: train anyway
        ("fp-a", _champion(None), False, False),  # champion without a recorded fingerprint: train
    ],
)
def test_decide_skip(fingerprint, champion, force, skips):
    decision = decide_skip(fingerprint, champion, force=force)
    assert (decision is not None) == skips
    if skips:
        assert decision.action == "skip" and decision.reason.startswith(SKIPPED_NO_NEW_DATA)


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "action"),
    [
        (3.0, None, 0.0, "promote"),  # first run: no champion
        (9.0, None, 0.5, "promote"),  # first run promotes whatever its loss
        (2.9, 3.0, 0.0, "promote"),  # better, margin 0
        (3.0, 3.0, 0.0, "keep"),  # a tie is not better
        (3.1, 3.0, 0.0, "keep"),  # worse
        (2.9, 3.0, 0.1, "promote"),  # better by exactly the margin
        (2.95, 3.0, 0.1, "keep"),  # better, but not by the margin
        (None, 3.0, 0.0, "keep"),  # challenger has no loss
        (math.nan, 3.0, 0.0, "keep"),
        (math.inf, 3.0, 0.0, "keep"),
    ],
)
def test_decide_promotion(challenger, champion, margin, action):
    decision = decide_promotion(challenger, champion, margin)
    assert decision.action == action
    assert decision.reason


def test_challenger_name_is_utc_and_a_valid_artifact_key():
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=2)))
    assert challenger_name(now) == "retrain-20250102-010405"


def test_comparable_needs_the_export_on_disk_and_the_same_base(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    assert "missing on disk" in comparable(_champion(path=str(export)), "builtin:tiny-gpt2")
    (export / "ckptflow-provenance.json").write_text("{}")
    assert comparable(_champion(path=str(export)), "builtin:tiny-gpt2") is None
    assert "do not compare" in comparable(_champion(path=str(export)), "gpt2")


# -- recording, with a real ledger ------------------------------------------------------------


def _exported_run(ledger: Ledger, home: Path, name: str, fingerprint: str) -> int:
    """A run with one committed checkpoint and an export directory; returns the export id."""
    run = ledger.create_run(
        name, fingerprint="run-fp", config={CONFIG_DATA_FINGERPRINT: fingerprint}, base_model="builtin:tiny-gpt2",
        total_steps=4,
    )
    ledger.begin_checkpoint(run.id, 4, str(home / "runs" / name / "checkpoint-4"))
    ckpt = ledger.commit_checkpoint(run.id, 4, epoch=2.0, metrics={"eval_loss": 3.0}, bytes=10, manifest_sha256="x")
    path = home / "exports" / name
    path.mkdir(parents=True)
    export = ledger.record_export(run.id, checkpoint_id=ckpt.id, path=str(path), merged=True, metrics={"eval_loss": 3.0})
    return export.id


def _promotion(run: str, fingerprint: str) -> DecisionRecord:
    return DecisionRecord(
        action="promote", reason="test", data_fingerprint=fingerprint, margin=0.0, challenger={"run": run}
    )


def test_record_promotions_moves_the_champion(tmp_path):
    home = tmp_path / "home"
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        assert current_champion(ledger) is None and read_pointer(home) is None
        first = _exported_run(ledger, home, "retrain-1", "fp-1")
        second = _exported_run(ledger, home, "retrain-2", "fp-2")

        recorded = record_decision(ledger, home, _promotion("retrain-1", "fp-1"), first)
        assert recorded.pointer == str(home / "exports" / CHAMPION_FILE)
        champion = current_champion(ledger)
        assert (champion.run, champion.export_id, champion.data_fingerprint) == ("retrain-1", first, "fp-1")

        record_decision(ledger, home, _promotion("retrain-2", "fp-2"), second)
        assert [(e.id, e.promoted) for e in ledger.exports()] == [(first, False), (second, True)]
        assert current_champion(ledger).run == "retrain-2"

    pointer = read_pointer(home)
    assert (pointer["run"], pointer["export_id"], pointer["data_fingerprint"]) == ("retrain-2", second, "fp-2")
    link = home / "exports" / CHAMPION_LINK
    assert link.is_symlink() and link.resolve() == (home / "exports" / "retrain-2").resolve()
    assert not list((home / "exports").glob(".*tmp*"))  # atomic writes left nothing behind
    log = [json.loads(line) for line in (home / "exports" / DECISIONS_FILE).read_text().splitlines()]
    assert [(d["action"], d["challenger"]["run"]) for d in log] == [("promote", "retrain-1"), ("promote", "retrain-2")]


def test_keep_and_skip_are_logged_but_change_nothing(tmp_path):
    home = tmp_path / "home"
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        first = _exported_run(ledger, home, "retrain-1", "fp-1")
        record_decision(ledger, home, _promotion("retrain-1", "fp-1"), first)
        champion = current_champion(ledger)
        skip = skip_record(decide_skip("fp-1", champion), champion, "fp-1", 0.0)
        keep = DecisionRecord(action="keep", reason="worse", data_fingerprint="fp-2", margin=0.0)
        for record in (skip, keep):
            assert record_decision(ledger, home, record).pointer is None
        assert current_champion(ledger) == champion
    actions = [json.loads(line)["action"] for line in (home / "exports" / DECISIONS_FILE).read_text().splitlines()]
    assert actions == ["promote", "skip", "keep"]


def test_a_real_directory_named_champion_is_never_replaced(tmp_path):
    home = tmp_path / "home"
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        export = _exported_run(ledger, home, CHAMPION_LINK, "fp-1")  # a run literally named "champion"
        record_decision(ledger, home, _promotion(CHAMPION_LINK, "fp-1"), export)
    assert (home / "exports" / CHAMPION_LINK).is_dir() and not (home / "exports" / CHAMPION_LINK).is_symlink()
    assert read_pointer(home)["run"] == CHAMPION_LINK


def test_promoting_an_unknown_export_fails(tmp_path):
    with Ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger, pytest.raises(KeyError):
        record_decision(ledger, tmp_path, _promotion("x", "fp"), 99)


def test_decision_records_are_plain_json():
    record = skip_record(Decision("skip", SKIPPED_NO_NEW_DATA), _champion(), "fp-a", 0.1)
    assert json.loads(json.dumps(record.to_json()))["champion"]["run"] == "retrain-1"
    assert datetime.fromisoformat(record.decided_at).tzinfo == UTC
