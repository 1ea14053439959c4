"""Resuming a crashed run with other settings or data is refused (exit 2, showing what differs); --new starts afresh."""

from __future__ import annotations

import json

import pytest
from ckptflow.ledger import Ledger, RunStatus

from tests.drills import cli, run_driver

pytestmark = pytest.mark.slow

DATA = {
    "CKPTFLOW_DATA__TRAIN": "train.jsonl",
    "CKPTFLOW_DATA__EVAL": "eval.jsonl",
    "CKPTFLOW_TRAIN__MAX_STEPS": "4",
    "CKPTFLOW_TRAIN__CHUNK_STEPS": "2",
}


def _write(path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def _state(home) -> tuple:
    with Ledger(f"sqlite:///{home / 'ledger.db'}") as ledger:
        run = ledger.get_run("fp")
        return run.status, run.fingerprint, [(a.id, a.status) for a in ledger.attempts(run.id)], [
            (c.step, c.state) for c in ledger.checkpoints(run.id)
        ]


@pytest.fixture
def prefect_api_url(prefect_harness):
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def test_changed_settings_or_data_refused_then_new_run(home, prefect_api_url):
    work = home.parent
    _write(work / "train.jsonl", [f"Training text number {i} about checkpoints." for i in range(8)])
    _write(work / "eval.jsonl", ["Held out text one.", "Held out text two."])
    # A run that crashed after checkpoint-2.
    code, out = run_driver(home, "fp", {**DATA, "CKPTFLOW_FAULT__AT_STEP": "3"})
    assert code == 1, out
    before = _state(home)
    env = {**DATA, "PREFECT_API_URL": prefect_api_url}

    # 1. Changed settings: refused, naming each setting, its old and new value and the env var.
    changed = cli("run", "--run-name", "fp", home=home, env={**env, "CKPTFLOW_TRAIN__LEARNING_RATE": "0.001"})
    assert changed.returncode == 2, changed.stderr
    assert "train.learning_rate: 0.0002 -> 0.001 (CKPTFLOW_TRAIN__LEARNING_RATE)" in changed.stderr
    assert "data fingerprint" not in changed.stderr and "--new" in changed.stderr

    # 2. Same settings, changed data (same file name, other content): refused, saying the data changed.
    _write(work / "train.jsonl", [f"Other training text {i}." for i in range(8)])
    data = cli("run", "--run-name", "fp", home=home, env=env)
    assert data.returncode == 2, data.stderr
    assert "data fingerprint:" in data.stderr and "(data or tokenizer changed)" in data.stderr
    assert "learning_rate" not in data.stderr
    for proc in (changed, data):
        assert "Traceback" not in proc.stderr and "Beginning flow run" not in proc.stderr
    assert _state(home) == before  # refused before anything was recorded or trained

    # 3. --new: a fresh run `fp-2` with the new data and settings; the crashed run is left as it was.
    fresh = cli("run", "--run-name", "fp", "--new", home=home, env={**env, "CKPTFLOW_TRAIN__LEARNING_RATE": "0.001"})
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "run fp-2 completed" in fresh.stderr
    with Ledger(f"sqlite:///{home / 'ledger.db'}") as ledger:
        new_run = ledger.get_run("fp-2")
        assert new_run.status == RunStatus.COMPLETED and new_run.fingerprint != before[1]
        assert new_run.config["settings"]["train"]["learning_rate"] == 0.001
    assert _state(home) == before
