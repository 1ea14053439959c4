"""Settings: sources and their priority, validation that names what to change, warnings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from ckptflow.errors import ConfigError
from ckptflow.settings import Settings, env_var_for, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_tutorial(home):
    s = load_settings()
    assert (s.model.name_or_path, s.data.train) == ("builtin:tiny-gpt2", "builtin:demo")
    assert (s.train.epochs, s.train.batch_size, s.train.learning_rate, s.train.seed) == (2, 2, 2e-4, 42)
    ck = s.checkpoint
    assert (ck.save_steps, ck.eval_steps, ck.save_total_limit, ck.retention) == (2, 2, 2, "best")
    assert (ck.metric_for_best_model, ck.greater_is_better) == ("eval_loss", False)
    assert Settings.model_fields["home"].default == Path(".ckptflow")
    assert s.ledger == f"sqlite:///{(home / 'ledger.db').resolve()}"  # CKPTFLOW_HOME set by the fixture


def test_source_priority_cli_over_env_over_dotenv_over_toml(home, tmp_path, monkeypatch):
    (tmp_path / "c.toml").write_text("[train]\nseed = 1\nbatch_size = 3\nlogging_steps = 5\nepochs = 7\n")
    (tmp_path / ".env").write_text("CKPTFLOW_TRAIN__SEED=2\nCKPTFLOW_TRAIN__BATCH_SIZE=4\nCKPTFLOW_TRAIN__LOGGING_STEPS=6\n")
    monkeypatch.setenv("CKPTFLOW_TRAIN__SEED", "3")
    monkeypatch.setenv("CKPTFLOW_TRAIN__BATCH_SIZE", "5")
    s = load_settings(tmp_path / "c.toml", train={"seed": 4})
    assert (s.train.seed, s.train.batch_size, s.train.logging_steps, s.train.epochs) == (4, 5, 6, 7)


def test_env_example_lists_every_setting_and_loads(home, tmp_path):
    text = (REPO / ".env.example").read_text()
    names = {line.split("=")[0] for line in text.splitlines() if line and not line.startswith("#")}
    expected = set()
    for group, field in Settings.model_fields.items():
        sub = getattr(field.annotation, "model_fields", None)
        expected |= {env_var_for((group, f)) for f in sub} if sub else {env_var_for((group,))}
    assert names == expected
    shutil.copy(REPO / ".env.example", tmp_path / ".env")
    assert load_settings() == Settings()


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"checkpoint": {"save_steps": 0}}, ["CKPTFLOW_CHECKPOINT__SAVE_STEPS"]),
        ({"checkpoint": {"eval_steps": -1}}, ["CKPTFLOW_CHECKPOINT__EVAL_STEPS"]),
        ({"checkpoint": {"save_total_limit": 0}}, ["CKPTFLOW_CHECKPOINT__SAVE_TOTAL_LIMIT"]),
        ({"checkpoint": {"eval_strategy": "no"}}, ["retention=best", "CKPTFLOW_CHECKPOINT__RETENTION"]),
        ({"checkpoint": {"save_steps": 3}}, ["not a multiple", "CKPTFLOW_CHECKPOINT__EVAL_STEPS"]),
        ({"checkpoint": {"metric_for_best_model": "bleu"}}, ["bleu", "CKPTFLOW_CHECKPOINT__METRIC_FOR_BEST_MODEL"]),
        ({"checkpoint": {"save_strategy": "epoch"}}, ["CKPTFLOW_CHECKPOINT__EVAL_STRATEGY"]),
        ({"train": {"max_steps": 0}}, ["max_steps"]),
        ({"train": {"batch_size": 0}}, ["CKPTFLOW_TRAIN__BATCH_SIZE"]),
        ({"train": {"launcher": "slurm"}}, ["CKPTFLOW_TRAIN__LAUNCHER"]),
        ({"model": {"lora_r": 0}}, ["CKPTFLOW_MODEL__LORA_R"]),
        ({"data": {"eval_fraction": 1.5}}, ["CKPTFLOW_DATA__EVAL_FRACTION"]),
    ],
)
def test_refusals_name_what_to_change(home, overrides, names):
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "warned"),
    [
        ({}, []),
        ({"checkpoint": {"save_total_limit": None}}, ["CKPTFLOW_CHECKPOINT__SAVE_TOTAL_LIMIT"]),
        (
            {"train": {"epochs": 1}, "checkpoint": {"save_strategy": "epoch", "eval_strategy": "epoch"}},
            ["no mid-run recovery"],
        ),
    ],
)
def test_warnings(home, overrides, warned):
    warnings = load_settings(**overrides).warnings()
    assert len(warnings) == len(warned)
    for text, w in zip(warned, warnings):
        assert text in w


def test_metric_names_accept_hf_short_form(home):
    s = load_settings(checkpoint={"metric_for_best_model": "mean_token_accuracy", "greater_is_better": True})
    assert s.checkpoint.metric_key == "eval_mean_token_accuracy"


def test_missing_config_file_is_bad_input(home):
    with pytest.raises(ConfigError, match="--config"):
        load_settings("nope.toml")


def test_fingerprint_ignores_operational_settings(home):
    base = load_settings().training_fingerprint()
    assert load_settings(train={"chunk_steps": 1, "retries": 0, "launcher": "subprocess"}).training_fingerprint() == base
    assert load_settings(checkpoint={"save_total_limit": 5}).training_fingerprint() == base
    assert load_settings(train={"learning_rate": 1e-3}).training_fingerprint() != base
