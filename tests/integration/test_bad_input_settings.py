"""Settings at the real CLI: every bad setting is refused before training or Prefect (exit 2, no
traceback, the message names the variable / file:line and the nearest valid name, nothing
changes); and a config file's relative paths resolve against the file's directory."""

from __future__ import annotations

import json

import pytest

from tests.badinput import Case, ckptflow, run_case
from tests.helpers import committed_steps, train_without_prefect

pytestmark = pytest.mark.slow

TOML = ("--config", "c.toml")


def _toml(args: tuple[str, ...], text: str, mentions: tuple[str, ...], id: str) -> Case:
    return Case(id, (*args, *TOML), mentions, files={"c.toml": text})


def _env(args: tuple[str, ...], env: dict[str, str], mentions: tuple[str, ...], id: str) -> Case:
    return Case(id, args, mentions, env=env)


def _dotenv(args: tuple[str, ...], text: str, mentions: tuple[str, ...], id: str) -> Case:
    return Case(id, args, mentions, files={".env": text})


PLAN, RUN = ("plan",), ("run", "--run-name", "x")
# rich wraps stderr at 80 columns when it is not a terminal, even inside a path; the messages are what is tested here.
WIDE = {"COLUMNS": "1000"}
GIB = "CKPTFLOW_CHECKPOINT__GREATER_IS_BETTER / `checkpoint.greater_is_better`"


def _var(group: str, field: str) -> str:
    return f"CKPTFLOW_{group.upper()}__{field.upper()} / `{group}.{field}`"


CASES = [
    # -- unknown names in a TOML file: file:line and the nearest name
    _toml(PLAN, "[trian]\nseed = 1\n", ("c.toml:1", "unknown section `trian`", "did you mean `train`?"), "toml-section"),
    _toml(RUN, "# tuned\nsave_steps = 4\n", ("c.toml:2", "unknown key `save_steps`", "[checkpoint]"), "toml-top-level-key"),
    _toml(PLAN, "[checkpoint]\nsave_step = 4\n", ("c.toml:2", "did you mean `checkpoint.save_steps`?"), "toml-key"),
    _toml(RUN, "[train]\neval_steps = 4\n", ("c.toml:2", "belongs under [checkpoint]"), "toml-key-wrong-section"),
    _toml(PLAN, "model.lora_rank = 4\n", ("c.toml:1", "did you mean `model.lora_r`?"), "toml-dotted-key"),
    _toml(PLAN, "[train\n", ("not valid TOML", "c.toml", "--config"), "toml-syntax"),
    Case("toml-missing", (*PLAN, "--config", "nope.toml"), ("nope.toml", "does not exist", "--config")),
    # -- unknown CKPTFLOW_* variables in the environment
    _env(RUN, {"CKPTFLOW_CHEKPOINT__SAVE_STEPS": "4"}, ("environment", "CKPTFLOW_CHEKPOINT__SAVE_STEPS", "did you mean CKPTFLOW_CHECKPOINT__SAVE_STEPS?"), "env-group"),
    _env(RUN, {"CKPTFLOW_CHECKPOINT_SAVE_STEPS": "4"}, ("environment", "double underscore", "CKPTFLOW_CHECKPOINT__SAVE_STEPS?"), "env-single-underscore"),
    _env(PLAN, {"CKPTFLOW_TRAIN__EPOCS": "3"}, ("environment", "did you mean CKPTFLOW_TRAIN__EPOCHS?"), "env-field"),
    _env(PLAN, {"CKPTFLOW_LEDGERURL": "sqlite://"}, ("did you mean CKPTFLOW_LEDGER_URL?",), "env-top-level"),
    _env(PLAN, {"ckptflow_trian__seed": "1"}, ("ckptflow_trian__seed", "CKPTFLOW_TRAIN__SEED"), "env-lowercase"),
    _env(PLAN, {"CKPTFLOW_TRAIN": '{"sed": 1}'}, ("`train.sed`", "CKPTFLOW_TRAIN", "not a setting"), "env-group-json"),
    _env(RUN, {"CKPTFLOW_CHECKPOINT": "save_steps=4"}, ("CKPTFLOW_CHECKPOINT", "not valid JSON", "CKPTFLOW_CHECKPOINT__FIELD"), "env-group-not-json"),
    # -- unknown variables in .env: its path and line
    _dotenv(RUN, "CKPTFLOW_TRAIN__SEED=1\nCKPTFLOW_TRAIN__SED=2\n", (".env:2", "did you mean CKPTFLOW_TRAIN__SEED?"), "dotenv-field"),
    _dotenv(PLAN, "# mine\n\nCKPTFLOW_MODEL_LORA_R=4\n", (".env:3", "double underscore", "CKPTFLOW_MODEL__LORA_R?"), "dotenv-single-underscore"),
    _dotenv(PLAN, "CKPTFLOW_CHEKPOINT__SAVE_STEPS=\n", (".env:1", "CKPTFLOW_CHECKPOINT__SAVE_STEPS"), "dotenv-empty-typo"),
    # -- greater_is_better against the metric's direction
    _toml(RUN, "[checkpoint]\ngreater_is_better = true\n", (GIB, "to false", "c.toml:2"), "toml-loss-greater"),
    _env(PLAN, {"CKPTFLOW_CHECKPOINT__GREATER_IS_BETTER": "true"}, (GIB, "better when lower", "to false"), "env-loss-greater"),
    _env(RUN, {"CKPTFLOW_CHECKPOINT__METRIC_FOR_BEST_MODEL": "mean_token_accuracy"}, (GIB, "better when higher", "to true"), "accuracy-not-greater"),
    _env(PLAN, {"CKPTFLOW_CHECKPOINT__METRIC_FOR_BEST_MODEL": "loss", "CKPTFLOW_CHECKPOINT__GREATER_IS_BETTER": "1"}, (GIB, "to false"), "short-loss-greater"),
    # -- messages name variables that exist
    _env(RUN, {"CKPTFLOW_TRAIN__MAX_STEPS": "0"}, (_var("train", "max_steps"),), "max-steps-0"),
    _env(PLAN, {"CKPTFLOW_TRAIN__MAX_STEPS": "-5"}, (_var("train", "max_steps"), "or -1"), "max-steps-negative"),
    _env(PLAN, {"CKPTFLOW_TRAIN__MAX_STEPS": "10", "CKPTFLOW_TRAIN__LOGGING_STEPS": "100"}, (_var("train", "logging_steps"), _var("train", "max_steps")), "logging-past-max-steps"),
    _env(PLAN, {"CKPTFLOW_CHECKPOINT__SAVE_STEPS": "3"}, (_var("checkpoint", "save_steps"), _var("checkpoint", "eval_steps")), "save-not-multiple-of-eval"),
    # -- non-finite floats
    _toml(PLAN, "[train]\n\nepochs = inf\n", ("c.toml:3", _var("train", "epochs"), "finite"), "toml-epochs-inf"),
    _env(RUN, {"CKPTFLOW_TRAIN__EPOCHS": "inf"}, (_var("train", "epochs"), "finite"), "epochs-inf"),
    _env(PLAN, {"CKPTFLOW_TRAIN__LEARNING_RATE": "nan"}, (_var("train", "learning_rate"),), "learning-rate-nan"),
    # -- zero / negative where only positive values work
    _env(RUN, {"CKPTFLOW_TRAIN__BATCH_SIZE": "0"}, (_var("train", "batch_size"), "greater than 0"), "batch-size-0"),
    _env(PLAN, {"CKPTFLOW_CHECKPOINT__SAVE_TOTAL_LIMIT": "0"}, (_var("checkpoint", "save_total_limit"),), "save-total-limit-0"),
    _env(PLAN, {"CKPTFLOW_TRAIN__SEED": "-1"}, (_var("train", "seed"),), "seed-negative"),
    _toml(PLAN, "[train]\nlearning_rate = 0\n", ("c.toml:2", _var("train", "learning_rate")), "toml-learning-rate-0"),
    # -- absurdly large
    _env(RUN, {"CKPTFLOW_TRAIN__BATCH_SIZE": "1000000000"}, (_var("train", "batch_size"), "less than or equal to 65536"), "batch-size-absurd"),
    _env(PLAN, {"CKPTFLOW_MODEL__LORA_ALPHA": "1000000000"}, (_var("model", "lora_alpha"),), "lora-alpha-absurd"),
    _env(PLAN, {"CKPTFLOW_MODEL__MAX_LENGTH": "1000000000000"}, (_var("model", "max_length"),), "max-length-absurd"),
    # -- unknown choices list the allowed ones
    _env(RUN, {"CKPTFLOW_TRAIN__LAUNCHER": "slurm"}, (_var("train", "launcher"), "'inprocess'", "'subprocess'", "'torchrun'"), "launcher"),
    _env(PLAN, {"CKPTFLOW_CHECKPOINT__SAVE_STRATEGY": "epochs"}, (_var("checkpoint", "save_strategy"), "'steps'", "'epoch'"), "save-strategy"),
    _toml(PLAN, '[checkpoint]\nretention = "worst"\n', ("c.toml:2", _var("checkpoint", "retention"), "'best'", "'recent'"), "toml-retention"),
    _env(PLAN, {"CKPTFLOW_CHECKPOINT__METRIC_FOR_BEST_MODEL": "bleu"}, (_var("checkpoint", "metric_for_best_model"), "eval_loss"), "metric-not-produced"),
    _env(PLAN, {"CKPTFLOW_CHECKPOINT__GREATER_IS_BETTER": "maybe"}, (_var("checkpoint", "greater_is_better"), "'maybe'"), "bool-not-a-bool"),
    _toml(PLAN, '[data]\ntrain = ""\n', ("c.toml:2", _var("data", "train")), "toml-empty-train"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_settings_are_refused_and_change_nothing(case, home, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = run_case(case, home=home, cwd=cwd, extra_env=WIDE)
    assert "Prefect" not in proc.stderr and "Starting temporary server" not in proc.stderr


def test_there_are_enough_cases():
    assert len(CASES) >= 35 and len({c.id for c in CASES}) == len(CASES)


ON_COMPLETED_HOME = [c for c in CASES if c.id in {"toml-section", "env-single-underscore", "toml-loss-greater"}]


@pytest.mark.parametrize("case", ON_COMPLETED_HOME, ids=lambda c: c.id)
def test_refusals_on_a_completed_home_change_nothing(case, completed_home, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    run_case(case, home=completed_home, cwd=cwd, extra_env=WIDE)


# -- config files behave like config files ------------------------------------------------------

DATA = "".join(json.dumps({"text": f"line {i}: the quick brown fox jumps over the lazy dog"}) + "\n" for i in range(6))


def _config_elsewhere(tmp_path, data: str | None = DATA):
    """`project/configs/run.toml` naming `data/train.jsonl` next to it; the cwd is `elsewhere/`."""
    configs, cwd = tmp_path / "project" / "configs", tmp_path / "elsewhere"
    (configs / "data").mkdir(parents=True)
    cwd.mkdir()
    if data is not None:
        (configs / "data" / "train.jsonl").write_text(data)
    (configs / "run.toml").write_text('[data]\ntrain = "data/train.jsonl"\neval_fraction = 0.34\n')
    return configs, cwd


def test_plan_reads_data_relative_to_the_config_file(home, tmp_path):
    configs, cwd = _config_elsewhere(tmp_path)
    (cwd / "data").mkdir()
    (cwd / "data" / "train.jsonl").write_text(DATA * 10)  # the cwd's file of the same name must not be read
    proc = ckptflow(
        "plan", "--config", "../project/configs/run.toml", "--json", cwd=cwd, env={"CKPTFLOW_HOME": str(home)}
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total_steps"] == 2 * 2  # 4 of 6 rows train (2 held out), batch 2, 2 epochs


def test_a_missing_file_named_by_a_config_shows_the_absolute_path(completed_home, tmp_path):
    # A completed home: the built-in model already exists, so a refusal must leave it exactly as it is.
    configs, cwd = _config_elsewhere(tmp_path, data=None)
    tried = str(configs / "data" / "train.jsonl")
    run_case(
        Case("missing", (*RUN, "--config", "../project/configs/run.toml"), ("does not exist", tried)),
        home=completed_home,
        cwd=cwd,
        extra_env=WIDE,
    )


def test_a_run_trains_from_the_config_files_directory(home, tmp_path, monkeypatch):
    from ckptflow.settings import load_settings

    configs, cwd = _config_elsewhere(tmp_path)
    monkeypatch.chdir(cwd)
    settings = load_settings("../project/configs/run.toml")
    settings = settings.model_copy(update={"home": home.resolve()})
    assert settings.data.train == str(configs / "data" / "train.jsonl")
    run = train_without_prefect(settings, "from-config")
    assert committed_steps(settings, run) == [2, 4]
