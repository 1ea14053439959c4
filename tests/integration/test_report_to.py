"""HF-native reporting: `train.report_to=tensorboard` writes real TensorBoard events under the run's directory."""

from __future__ import annotations

import pytest

from tests.helpers import settings_for, train_without_prefect

pytestmark = pytest.mark.slow


def test_tensorboard_events_are_readable_with_tensorboards_own_reader(home, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    settings = settings_for(home, train={"report_to": "tensorboard", "chunk_steps": 2})
    train_without_prefect(settings, "tb")
    log_dir = settings.run_dir("tb") / "tensorboard"
    events = sorted(log_dir.glob("events.out.tfevents.*"))
    assert len(events) == 2  # one writer per chunk, both in the run's directory
    scalars: dict[str, list[int]] = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4]
    assert sorted(scalars["eval/loss"]) == [2, 4]
    assert not list(settings.checkpoints_dir("tb").glob("runs"))  # nothing beside the checkpoints


@pytest.mark.parametrize(("value", "stored"), [("none", "none"), ("", "none"), ("TensorBoard, mlflow", "tensorboard,mlflow")])
def test_report_to_values(home, value, stored):
    assert settings_for(home, train={"report_to": value}).train.report_to == stored


def test_report_to_does_not_change_the_run_fingerprint(home):
    plain = settings_for(home)
    assert settings_for(home, train={"report_to": "tensorboard"}).training_fingerprint() == plain.training_fingerprint()
