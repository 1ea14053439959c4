"""Exports don't pile up: thirty retrain decisions leave the champion, the previous champion and the last N
challengers on disk and in the ledger; `rollback` restores the previous champion once, never a pruned export."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ckptflow.export import PROVENANCE_NAME
from ckptflow.export_retention import prune_exports
from ckptflow.ledger import CheckpointState, Ledger
from ckptflow.promotion import (
    CHAMPION_FILE,
    CHAMPION_LINK,
    DecisionRecord,
    NothingToRollBackError,
    challenger_name,
    record_decision,
    rollback,
)
from ckptflow.remote import upload_export
from tests.badinput import ckptflow

KEEP = 2
DECISIONS = 30


def _challenger(ledger: Ledger, home: Path, night: int, remote_url: str | None = None) -> tuple[str, int]:
    """A challenger run with one committed checkpoint and its export directory (what retrain leaves)."""
    name = challenger_name(datetime(2026, 1, 1, 2, tzinfo=UTC) + timedelta(days=night))
    run = ledger.create_run(name, fingerprint=f"fp{night}", config={"settings": {}, "data_fingerprint": f"d{night}"},
                            base_model="builtin:tiny-gpt2", total_steps=4)  # fmt: skip
    ckpt_dir = home / "runs" / name / "checkpoints" / "checkpoint-4"
    ledger.begin_checkpoint(run.id, 4, str(ckpt_dir))
    ckpt = ledger.commit_checkpoint(run.id, 4, epoch=2.0, metrics={"eval_loss": 6.0}, bytes=1, manifest_sha256="s")
    export_dir = home / "exports" / name
    export_dir.mkdir(parents=True)
    (export_dir / PROVENANCE_NAME).write_text(json.dumps({"run": name}))
    (export_dir / "model.safetensors").write_bytes(b"weights")
    export = ledger.record_export(run.id, checkpoint_id=ckpt.id, path=str(export_dir), merged=True, metrics={})
    if remote_url:  # as retrain's export does with checkpoint.remote_url
        upload_export(export_dir, remote_url, name, PROVENANCE_NAME)
    return name, export.id


def test_thirty_decisions_keep_champion_previous_and_last_challengers_then_rollback(home, tmp_path, s3, s3_remote):
    remote_url, bucket = s3_remote
    foreign = home / "exports" / "mine"  # a `ckptflow run` export: never a challenger, never pruned
    foreign.mkdir(parents=True)
    (foreign / PROVENANCE_NAME).write_text("{}")
    champions: list[str] = []
    with Ledger(f"sqlite:///{home / 'ledger.db'}", home=home) as ledger:
        for night in range(DECISIONS):
            name, export_id = _challenger(ledger, home, night, remote_url)
            action = "promote" if night % 4 == 0 else "keep"  # a new champion every fourth night
            record = DecisionRecord(action=action, reason="test", data_fingerprint=f"d{night}", margin=0.0,
                                    challenger={"run": name})  # fmt: skip
            record_decision(ledger, home, record, export_id)
            if action == "promote":
                champions.append(name)
            prune_exports(ledger, home, KEEP, remote_url=remote_url)
        exports = ledger.exports()
    live = {Path(e.path).name for e in exports if e.pruned_at is None}
    last_challengers = {challenger_name(datetime(2026, 1, 1, 2, tzinfo=UTC) + timedelta(days=n)) for n in (28, 29)}
    expected = {champions[-1], champions[-2], *last_challengers}
    assert live == expected
    on_disk = {p.name for p in (home / "exports").iterdir() if p.is_dir() and not p.is_symlink()}
    assert on_disk == expected | {"mine"}
    in_bucket = {key.split("/")[2] for key in s3.keys(bucket) if key.endswith(PROVENANCE_NAME)}  # team/exports/<run>/…
    assert in_bucket == expected
    assert {key.split("/")[2] for key in s3.keys(bucket)} == expected  # pruned exports left nothing behind
    assert all(e.pruned_reason for e in exports if e.pruned_at is not None)
    assert sum(e.promoted for e in exports) == 1

    # rollback: the previous champion again (ledger, pointer, symlink); a second rollback is refused.
    env = {"CKPTFLOW_HOME": str(home)}
    first = ckptflow("rollback", "--json", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert json.loads((home / "exports" / CHAMPION_FILE).read_text())["run"] == champions[-2]
    assert (home / "exports" / CHAMPION_LINK).resolve() == (home / "exports" / champions[-2]).resolve()
    second = ckptflow("rollback", cwd=tmp_path, env=env)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert "nothing to roll back to" in second.stderr
    assert json.loads((home / "exports" / CHAMPION_FILE).read_text())["run"] == champions[-2]


def test_rollback_without_a_champion_is_refused(home):
    with Ledger(f"sqlite:///{home / 'ledger.db'}", home=home) as ledger, pytest.raises(NothingToRollBackError):
        rollback(ledger, home)


def test_a_checkpoint_state_is_untouched_by_export_retention(home):
    with Ledger(f"sqlite:///{home / 'ledger.db'}", home=home) as ledger:
        for night in range(4):
            _challenger(ledger, home, night)
        prune_exports(ledger, home, 1)
        run = ledger.get_run(challenger_name(datetime(2026, 1, 1, 2, tzinfo=UTC)))
        assert [c.state for c in ledger.checkpoints(run.id)] == [CheckpointState.COMMITTED]
