"""Settings: sources and their priority, validation that names what to change, warnings."""

from __future__ import annotations

import math
import shutil
import typing
from pathlib import Path

import annotated_types
import pytest
from ckptflow.config_sources import NON_SETTING_VARIABLES
from ckptflow.errors import ConfigError
from ckptflow.settings import Settings, env_var_for, load_settings, settings_from_json

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
        ({"train": {"max_steps": 0}}, ["CKPTFLOW_TRAIN__MAX_STEPS", "`train.max_steps`"]),
        ({"train": {"max_steps": -2}}, ["CKPTFLOW_TRAIN__MAX_STEPS / `train.max_steps`", "or -1"]),
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


# -- every field: bounds, non-finite floats, unknown choices ---------------------------------------


def _fields():
    """(group, field, FieldInfo) of every grouped setting."""
    for group, info in Settings.model_fields.items():
        for name, field in getattr(info.annotation, "model_fields", {}).items():
            yield group, name, field


def _bound_violations():
    """(group, field, a value just outside a declared bound) for every bounded numeric field."""
    cases = []
    for group, name, field in _fields():
        for meta in field.metadata:
            for attr, step in (("gt", 0), ("ge", -1), ("lt", 0), ("le", 1)):
                bound = getattr(meta, attr, None)
                if isinstance(meta, annotated_types.BaseMetadata) and bound is not None:
                    cases.append((group, name, bound + step))
    return cases


def _float_fields():
    return [(g, n) for g, n, f in _fields() if float in (f.annotation, *typing.get_args(f.annotation))]


def _choice_fields():
    out = []
    for group, name, field in _fields():
        literal = next((a for a in (field.annotation, *typing.get_args(field.annotation)) if typing.get_origin(a) is typing.Literal), None)
        if literal is not None:
            out.append((group, name, typing.get_args(literal)))
    return out


BOUND_VIOLATIONS = _bound_violations()


def test_every_numeric_setting_is_bounded():
    numeric = {(g, n) for g, n, f in _fields() if {int, float} & {f.annotation, *typing.get_args(f.annotation)}}
    bounded = {(g, n) for g, n, _ in BOUND_VIOLATIONS}
    # a number without a bound would let a typo (-1, 1e30) through to HF, torch or Prefect
    assert numeric - bounded == set(), numeric - bounded
    assert len(BOUND_VIOLATIONS) >= 35


@pytest.mark.parametrize(("group", "name", "value"), BOUND_VIOLATIONS, ids=lambda v: str(v))
def test_a_value_outside_its_bound_names_the_variable_and_key(home, monkeypatch, group, name, value):
    monkeypatch.setenv(env_var_for((group, name)), str(value))
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert f"{env_var_for((group, name))} / `{group}.{name}`" in message
    assert f"from {env_var_for((group, name))} in environment" in message


@pytest.mark.parametrize(("group", "name"), _float_fields(), ids=lambda v: str(v))
@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_non_finite_floats_are_refused(home, monkeypatch, group, name, value):
    monkeypatch.setenv(env_var_for((group, name)), value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert f"{env_var_for((group, name))} / `{group}.{name}`" in str(info.value)


def test_non_finite_floats_from_toml_are_refused(home, tmp_path):
    (tmp_path / "c.toml").write_text("[train]\nepochs = inf\nlearning_rate = nan\n")
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "c.toml")
    message = str(info.value)
    assert "c.toml:2" in message and "CKPTFLOW_TRAIN__EPOCHS / `train.epochs`" in message
    assert "c.toml:3" in message and "CKPTFLOW_TRAIN__LEARNING_RATE / `train.learning_rate`" in message


@pytest.mark.parametrize(("group", "name", "choices"), _choice_fields(), ids=lambda v: str(v))
def test_an_unknown_choice_lists_the_allowed_values(home, monkeypatch, group, name, choices):
    monkeypatch.setenv(env_var_for((group, name)), "bogus")
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert env_var_for((group, name)) in message and "'bogus'" in message
    assert all(f"'{choice}'" in message for choice in choices), message


# -- contradictions -----------------------------------------------------------------------------

GIB = "CKPTFLOW_CHECKPOINT__GREATER_IS_BETTER / `checkpoint.greater_is_better`"
METRIC = "CKPTFLOW_CHECKPOINT__METRIC_FOR_BEST_MODEL / `checkpoint.metric_for_best_model`"


@pytest.mark.parametrize(
    ("overrides", "names"),
    [
        ({"checkpoint": {"greater_is_better": True}}, [GIB, METRIC, "better when lower", "to false"]),
        ({"checkpoint": {"metric_for_best_model": "loss", "greater_is_better": True}}, [GIB, "to false"]),
        ({"checkpoint": {"metric_for_best_model": "eval_mean_token_accuracy"}}, [GIB, "better when higher", "to true"]),
        ({"checkpoint": {"metric_for_best_model": "perplexity", "greater_is_better": True}}, [GIB, METRIC, "not produced"]),
        (
            {"checkpoint": {"greater_is_better": True, "eval_strategy": "no", "retention": "recent"}},
            [GIB, "better when lower"],
        ),
        (
            {"train": {"max_steps": 10, "logging_steps": 11}},
            ["CKPTFLOW_TRAIN__LOGGING_STEPS / `train.logging_steps`", "CKPTFLOW_TRAIN__MAX_STEPS / `train.max_steps`"],
        ),
        (
            {"checkpoint": {"save_steps": 3}},
            ["CKPTFLOW_CHECKPOINT__SAVE_STEPS / `checkpoint.save_steps`", "CKPTFLOW_CHECKPOINT__EVAL_STEPS / `checkpoint.eval_steps`"],
        ),
        (
            {"checkpoint": {"eval_strategy": "no"}},
            ["CKPTFLOW_CHECKPOINT__EVAL_STRATEGY / `checkpoint.eval_strategy`", "CKPTFLOW_CHECKPOINT__RETENTION / `checkpoint.retention`"],
        ),
    ],
    ids=["loss-greater", "short-loss-greater", "accuracy-not-greater", "perplexity-greater", "loss-greater-no-eval", "logging-past-max-steps", "save-not-multiple", "best-without-eval"],
)
def test_contradictions_name_every_variable_involved(home, overrides, names):
    with pytest.raises(ConfigError) as info:
        load_settings(**overrides)
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"checkpoint": {"metric_for_best_model": "eval_mean_token_accuracy", "greater_is_better": True}},
        {"checkpoint": {"metric_for_best_model": "eval_entropy", "greater_is_better": True}},  # no known direction
        {"checkpoint": {"metric_for_best_model": "eval_entropy", "greater_is_better": False}},
        {"train": {"max_steps": 10, "logging_steps": 10}},
        {"train": {"logging_steps": 1000}},  # total steps unknown until the data is read
    ],
)
def test_consistent_settings_load(home, overrides):
    load_settings(**overrides)


def test_a_cross_field_message_says_where_each_value_was_set(home, tmp_path, monkeypatch):
    (tmp_path / "c.toml").write_text("[checkpoint]\nsave_steps = 3\n")
    monkeypatch.setenv("CKPTFLOW_CHECKPOINT__EVAL_STEPS", "2")
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "c.toml")
    message = str(info.value)
    assert f"`checkpoint.save_steps` from {tmp_path / 'c.toml'}:2" in message
    assert "`checkpoint.eval_steps` from CKPTFLOW_CHECKPOINT__EVAL_STEPS in environment" in message


def test_a_recorded_config_that_no_longer_validates_is_bad_input(home):
    config = Settings().to_json()
    config["checkpoint"]["greater_is_better"] = True
    with pytest.raises(ConfigError, match="--new"):
        settings_from_json(config)


# -- unknown names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "env", "dotenv", "mentions"),
    [
        ("save_steps = 4\n", {}, "", ["c.toml:1", "unknown key `save_steps`", "under [checkpoint]"]),
        ("[trian]\nseed = 1\n", {}, "", ["c.toml:1", "unknown section `trian`", "did you mean `train`?"]),
        ("[train]\nseed = 1\nsed = 2\n", {}, "", ["c.toml:3", "`sed` in [train]", "did you mean `train.seed`?"]),
        ("[train]\n\nsave_steps = 2\n", {}, "", ["c.toml:3", "belongs under [checkpoint]"]),
        ("train.sed = 1\n", {}, "", ["c.toml:1", "did you mean `train.seed`?"]),
        ("checkpoint = { save_step = 2 }\n", {}, "", ["c.toml:1", "did you mean `checkpoint.save_steps`?"]),
        ("[train]\nzzzz = 1\n", {}, "", ["c.toml:2", "[train] has: batch_size, bf16, chunk_steps"]),
        ("[model]\nlora_target_modules = [\n  \"c_attn\",\n]\nlora_rr = 4\n", {}, "", ["c.toml:5", "`model.lora_r`"]),
        ("", {"CKPTFLOW_CHEKPOINT__SAVE_STEPS": "4"}, "", ["environment", "CKPTFLOW_CHEKPOINT__SAVE_STEPS", "did you mean CKPTFLOW_CHECKPOINT__SAVE_STEPS?"]),
        ("", {"CKPTFLOW_CHECKPOINT_SAVE_STEPS": "4"}, "", ["environment", "double underscore", "CKPTFLOW_CHECKPOINT__SAVE_STEPS?"]),
        ("", {"CKPTFLOW_TRAIN__EPOCS": "3"}, "", ["did you mean CKPTFLOW_TRAIN__EPOCHS?"]),
        ("", {"CKPTFLOW_HOMR": "x"}, "", ["did you mean CKPTFLOW_HOME?"]),
        ("", {"CKPTFLOW_LEDGER__URL": "x"}, "", ["did you mean CKPTFLOW_LEDGER_URL?"]),
        ("", {"CKPTFLOW_TRAIN__SEED__X": "1"}, "", ["CKPTFLOW_TRAIN__SEED__X"]),
        ("", {"ckptflow_trian__seed": "1"}, "", ["ckptflow_trian__seed", "CKPTFLOW_TRAIN__SEED"]),
        ("", {"CKPTFLOW_TRIAN__SEED": ""}, "", ["CKPTFLOW_TRIAN__SEED"]),  # empty, but still a typo
        ("", {}, "# comment\nCKPTFLOW_TRAIN__SEED=1\nCKPTFLOW_TRAIN__SED=2\n", [".env:3", "CKPTFLOW_TRAIN__SED", "did you mean CKPTFLOW_TRAIN__SEED?"]),
        ("", {}, "\n\nexport CKPTFLOW_CHECKPOINT_EVAL_STEPS=2\n", [".env:3", "double underscore", "CKPTFLOW_CHECKPOINT__EVAL_STEPS?"]),
        ("", {}, "CKPTFLOW_MODLE__LORA_R=\n", [".env:1", "CKPTFLOW_MODEL__LORA_R"]),
    ],
    ids=[
        "toml-top-level-key", "toml-section", "toml-key", "toml-key-in-wrong-section", "toml-dotted-key",
        "toml-inline-table", "toml-no-near-name", "toml-after-multiline-array", "env-group", "env-single-underscore",
        "env-field", "env-top-level", "env-top-level-as-group", "env-too-deep", "env-lowercase", "env-empty-typo",
        "dotenv-field", "dotenv-single-underscore", "dotenv-empty-typo",
    ],
)
def test_unknown_names_are_refused_with_source_and_nearest_name(home, tmp_path, monkeypatch, toml, env, dotenv, mentions):
    (tmp_path / "c.toml").write_text(toml)
    (tmp_path / ".env").write_text(dotenv)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "c.toml")
    message = str(info.value)
    for text in mentions:
        assert text in message
    if "c.toml:" in " ".join(mentions):
        assert str(tmp_path / "c.toml") in message  # the file, absolute
    if ".env:" in " ".join(mentions):
        assert str(tmp_path / ".env") in message


def test_every_unknown_name_is_reported_at_once(home, tmp_path, monkeypatch):
    (tmp_path / "c.toml").write_text("[trian]\n[train]\nsed = 1\n")
    (tmp_path / ".env").write_text("CKPTFLOW_TRAIN__EPOCS=1\n")
    monkeypatch.setenv("CKPTFLOW_CHEKPOINT__SAVE_STEPS", "2")
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "c.toml")
    assert len(str(info.value).splitlines()) == 1 + 4


def test_unknown_override_groups_and_fields_are_refused(home):
    with pytest.raises(ConfigError, match="did you mean `train`"):
        load_settings(trian={"seed": 1})
    with pytest.raises(ConfigError, match="did you mean `train.seed`"):
        load_settings(train={"sed": 1})


@pytest.mark.parametrize("name", sorted(NON_SETTING_VARIABLES) + ["CKPTFLOW_BENCH_RESULTS", "CKPTFLOW_BENCH_PROBE"])
def test_ckptflow_variables_that_are_not_settings_are_allowed(home, tmp_path, monkeypatch, name):
    monkeypatch.setenv(name, "1")
    (tmp_path / ".env").write_text(f"{name}=1\nHF_TOKEN=x\nPREFECT_API_URL=http://127.0.0.1:4200/api\n")
    assert load_settings() == Settings()


def test_non_setting_variables_are_used_somewhere():
    """The allowlist holds only names ckptflow really reads: a stale entry would hide a typo."""
    sources = "".join(p.read_text() for p in REPO.rglob("*") if p.suffix in {".py", ".yaml", ".sh"} and ".venv" not in p.parts and "config_sources.py" != p.name)
    for name in NON_SETTING_VARIABLES:
        assert name in sources, name


def test_empty_values_mean_default_and_groups_take_json(home, tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("CKPTFLOW_TRAIN__SEED=\nCKPTFLOW_CHECKPOINT__SAVE_TOTAL_LIMIT=\nCKPTFLOW_MODEL__LORA_TARGET_MODULES=\n")
    monkeypatch.setenv("CKPTFLOW_CHECKPOINT", '{"save_steps": 4, "eval_steps": 4}')
    s = load_settings()
    assert (s.train.seed, s.checkpoint.save_total_limit, s.model.lora_target_modules) == (42, 2, None)
    assert (s.checkpoint.save_steps, s.checkpoint.eval_steps) == (4, 4)


@pytest.mark.parametrize(
    ("toml", "dotenv", "env", "where"),
    [
        ("[train]\n\nbatch_size = 0\n", "", {}, "from {tmp}/c.toml:3"),
        ("", "\nCKPTFLOW_TRAIN__BATCH_SIZE=0\n", {}, "from {tmp}/.env:2"),
        ("[train]\nbatch_size = 4\n", "", {"CKPTFLOW_TRAIN__BATCH_SIZE": "0"}, "from CKPTFLOW_TRAIN__BATCH_SIZE in environment"),
    ],
    ids=["toml", "dotenv", "env-over-toml"],
)
def test_a_field_error_says_where_the_value_came_from(home, tmp_path, monkeypatch, toml, dotenv, env, where):
    (tmp_path / "c.toml").write_text(toml)
    (tmp_path / ".env").write_text(dotenv)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "c.toml")
    assert where.format(tmp=tmp_path) in str(info.value)
    assert "CKPTFLOW_TRAIN__BATCH_SIZE / `train.batch_size`" in str(info.value)


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("[train\n", ["not valid TOML", "line 1"]),
        ("[train]\nseed = \n", ["not valid TOML", "line 2"]),
        (b"\xff\xfe", ["cannot read config file"]),
    ],
)
def test_an_unreadable_config_file_is_bad_input(home, tmp_path, text, mentions):
    path = tmp_path / "c.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    for m in mentions:
        assert m in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("env", "dotenv", "mentions"),
    [
        ({"CKPTFLOW_TRAIN": "notjson"}, "", ["CKPTFLOW_TRAIN in the environment is not valid JSON", "CKPTFLOW_TRAIN__FIELD"]),
        ({}, "CKPTFLOW_CHECKPOINT={\n", ["CKPTFLOW_CHECKPOINT in .env is not valid JSON"]),
    ],
)
def test_a_group_variable_that_is_not_json_is_bad_input(home, tmp_path, monkeypatch, env, dotenv, mentions):
    (tmp_path / ".env").write_text(dotenv)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    for text in mentions:
        assert text in str(info.value)


def test_unknown_report_to_integration_is_refused(home, monkeypatch):
    from ckptflow.errors import ConfigError
    from ckptflow.settings import load_settings

    monkeypatch.setenv("CKPTFLOW_TRAIN__REPORT_TO", "tensorbord")
    with pytest.raises(ConfigError, match="CKPTFLOW_TRAIN__REPORT_TO") as refused:
        load_settings()
    assert "tensorboard" in str(refused.value)
