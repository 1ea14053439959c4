"""Corruption injection: `ckptflow verify` finds it and names the files; resume and export fall back.

Each case interrupts a real run after checkpoint-6 (committed: 4 and 6), damages checkpoint-6
(or leaves a partial checkpoint-8), then: `ckptflow verify` exits 1 naming the file; running
the run again resumes from checkpoint-4 with the reason on the attempt row and ends
bit-identical; on the finished run, the same damage to the best checkpoint makes the export
fall back to the next best, saying why in the export notes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from ckptflow.integrity import MANIFEST_NAME
from ckptflow.ledger import AttemptStatus, CheckpointState, Ledger

from tests.drills import DRILL_ENV, cli, final_diff, full_verify, run_driver
from tests.helpers import ADAPTER_FILE, settings_for

pytestmark = pytest.mark.slow


def _truncate(d: Path) -> str:
    p = d / ADAPTER_FILE
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return f"{d.name}/{ADAPTER_FILE}: size"


def _flip(d: Path) -> str:
    p = d / "optimizer.pt"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    return f"{d.name}/optimizer.pt: sha256 differs"


def _delete(d: Path) -> str:
    (d / "scheduler.pt").unlink()
    return f"{d.name}/scheduler.pt: missing"


def _remove_manifest(d: Path) -> str:
    (d / MANIFEST_NAME).unlink()
    return f"{d.name}/{MANIFEST_NAME}: missing manifest"


DAMAGE: dict[str, Callable[[Path], str]] = {
    "truncate-file": _truncate,
    "flip-byte": _flip,
    "delete-file": _delete,
    "remove-manifest": _remove_manifest,
}


def _interrupted_run(home: Path, name: str) -> None:
    """A run that failed at step 7: checkpoints 4 and 6 committed (2 pruned by retention)."""
    code, out = run_driver(home, name, {"CKPTFLOW_FAULT__AT_STEP": "7"})
    assert code == 1 and "injected fault at step 7" in out, out
    assert _committed(home, name) == [4, 6]


def _ledger(home: Path) -> Ledger:
    return Ledger(f"sqlite:///{(home / 'ledger.db').resolve()}")


def _committed(home: Path, name: str) -> list[int]:
    with _ledger(home) as ledger:
        return [c.step for c in ledger.checkpoints(ledger.get_run(name).id, [CheckpointState.COMMITTED])]


def _verify_fails_naming(home: Path, name: str, expected: str) -> None:
    proc = cli("verify", name, home=home)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert expected in proc.stderr, proc.stderr
    assert proc.stderr.count(expected) == 1, proc.stderr  # said once, not repeated


def _resume_and_check(home: Path, name: str, resumed_from: int, mentioned: str) -> None:
    code, out = run_driver(home, name)
    assert code == 0, out
    with _ledger(home) as ledger:
        attempts = ledger.attempts(ledger.get_run(name).id)
    rerun = [a for a in attempts if a.status == AttemptStatus.COMPLETED]
    trained = [a for a in rerun if a.start_step < a.end_step]
    assert (trained[-1].chunk, trained[-1].resumed_from_step) == (1, resumed_from)
    # The warning is on the rerun's first attempt row (chunk 0's, which had nothing else to do).
    assert any(mentioned in (a.notes or "") for a in rerun), [a.notes for a in attempts]
    assert final_diff(home, name) == 0.0
    quarantined = [p.name for p in (home / "runs" / name / "quarantine").iterdir()]
    assert any(q.startswith(f"{mentioned}-") for q in quarantined), quarantined


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_found_and_skipped_by_resume_and_export(home, kind):
    name = f"damaged-{kind}"
    _interrupted_run(home, name)
    ckpts = home / "runs" / name / "checkpoints"

    # 1. Damage the newest checkpoint (the resume point): verify names the file, resume falls back to 4.
    expected = DAMAGE[kind](ckpts / "checkpoint-6")
    _verify_fails_naming(home, name, expected)
    _resume_and_check(home, name, resumed_from=4, mentioned="checkpoint-6")
    assert full_verify(home, name) == {}

    # 2. The run is finished (6 and 8 kept): damage the best; export falls back to the other one.
    from ckptflow import pipeline

    settings = settings_for(home, **_overrides())
    with _ledger(home) as ledger:
        rows = ledger.checkpoints(ledger.get_run(name).id, [CheckpointState.COMMITTED])
    best = min(rows, key=lambda c: (c.metrics["eval_loss"], c.step))
    other = next(c.step for c in rows if c.step != best.step)
    expected = DAMAGE[kind](Path(best.path))
    _verify_fails_naming(home, name, expected)
    result = pipeline.export_run(settings, name)
    assert result["step"] == other
    assert any(f"checkpoint-{best.step} failed verification" in n and expected in n for n in result["notes"])
    provenance = json.loads((Path(result["path"]) / "ckptflow-provenance.json").read_text())
    assert provenance["notes"] == result["notes"] and provenance["step"] == other
    assert full_verify(home, name) == {}  # the damaged one is quarantined, no longer committed


def test_partial_directory_is_found_and_quarantined_on_resume(home):
    name = "partial-dir"
    _interrupted_run(home, name)
    ckpts = home / "runs" / name / "checkpoints"
    partial = ckpts / "checkpoint-8"  # what a crash in the middle of HF's save leaves
    partial.mkdir()
    for f in (ADAPTER_FILE, "adapter_config.json"):
        shutil.copy(ckpts / "checkpoint-6" / f, partial / f)
    _verify_fails_naming(home, name, f"checkpoint-8/{MANIFEST_NAME}: missing manifest")
    doc = json.loads(cli("verify", name, "--json", home=home).stdout)
    assert (doc["ok"], doc["checked"], list(doc["problems"])) == (False, [4, 6], ["8"])
    _resume_and_check(home, name, resumed_from=6, mentioned="checkpoint-8")
    assert cli("verify", name, home=home).returncode == 0


def _overrides() -> dict:
    """DRILL_ENV as load_settings overrides (the settings the drill runs were trained with)."""
    out: dict = {}
    for key, value in DRILL_ENV.items():
        group, field = key.removeprefix("CKPTFLOW_").lower().split("__")
        out.setdefault(group, {})[field] = value
    return out
