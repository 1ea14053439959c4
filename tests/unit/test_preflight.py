"""Preflight's checks one by one, in-process: tables of inputs → refused (naming what to change) or not."""

from __future__ import annotations

import pytest

from ckptflow import preflight
from ckptflow.data import SplitSizes, check_split
from ckptflow.errors import BadInputError, DataError, HomeError
from ckptflow.modeling import ModelConfigError, ModelShape, ResolvedModel, config_json, estimate_training_memory, model_shape
from ckptflow.settings import DataSettings, load_settings

TINY = ModelShape(vocab=1000, hidden=64, layers=2, heads=2, positions=256)


@pytest.mark.parametrize(
    ("overrides", "env_var"),
    [
        ({"train": {"epochs": float("inf")}}, "CKPTFLOW_TRAIN__EPOCHS"),
        ({"train": {"learning_rate": float("inf")}}, "CKPTFLOW_TRAIN__LEARNING_RATE"),
        ({"train": {"retry_delay_seconds": float("inf")}}, "CKPTFLOW_TRAIN__RETRY_DELAY_SECONDS"),
        ({"export": {"promotion_margin": float("inf")}}, "CKPTFLOW_EXPORT__PROMOTION_MARGIN"),
        ({"fault": {"pause_seconds": float("inf")}}, "CKPTFLOW_FAULT__PAUSE_SECONDS"),
    ],
)
def test_non_finite_settings_are_refused_naming_the_variable(home, overrides, env_var):
    with pytest.raises(BadInputError, match=env_var):
        preflight.check_finite(load_settings(**overrides))


def test_finite_defaults_pass(home):
    preflight.check_finite(load_settings())


@pytest.mark.parametrize(
    ("train_rows", "eval_rows", "eval_fraction", "evaluates", "refused"),
    [
        (4, 1, 0.1, True, None),
        (1, 0, 0.1, True, "1 row"),
        (3, 0, 0.0, True, "CKPTFLOW_DATA__EVAL_FRACTION"),
        (1, 0, 0.1, False, None),  # no evaluation: one row trains
        (3, 0, 0.0, False, None),
    ],
)
def test_split_needs_eval_rows_only_when_evaluating(train_rows, eval_rows, eval_fraction, evaluates, refused):
    data = DataSettings(train="t.jsonl", eval_fraction=eval_fraction)
    sizes = SplitSizes(train_rows, eval_rows, "t.jsonl")
    if refused is None:
        check_split(data, sizes, evaluates=evaluates)
    else:
        with pytest.raises(DataError, match=refused):
            check_split(data, sizes, evaluates=evaluates)


def test_memory_estimate_grows_with_batch_and_length_and_caps_at_rows():
    small = estimate_training_memory(TINY, batch_size=2, rows=4, max_length=128)
    bigger = estimate_training_memory(TINY, batch_size=4, rows=4, max_length=128)
    longer = estimate_training_memory(TINY, batch_size=4, rows=4, max_length=256)
    capped = estimate_training_memory(TINY, batch_size=400, rows=4, max_length=128)
    beyond_positions = estimate_training_memory(TINY, batch_size=4, rows=4, max_length=10_000)
    assert small.total < bigger.total < longer.total
    assert capped.batch == 4 and capped.activations == bigger.activations and capped.sampler > bigger.sampler
    assert beyond_positions.seq == 256


def test_a_step_beyond_the_ram_is_refused_with_the_numbers(home):
    big = ModelShape(vocab=50257, hidden=4096, layers=48, heads=32, positions=4096)  # ~38 GiB of fp32 weights alone
    settings = load_settings(train={"batch_size": 8}, model={"max_length": 4096})
    with pytest.raises(BadInputError, match="CKPTFLOW_TRAIN__BATCH_SIZE to at most") as exc:
        preflight.check_memory(settings, big, SplitSizes(100, 10, "data"))
    assert "GiB" in str(exc.value) and "CKPTFLOW_MODEL__MAX_LENGTH" in str(exc.value)
    preflight.check_memory(load_settings(), TINY, SplitSizes(4, 1, "demo"))


def test_home_checks(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(HomeError, match="is a file"):
        preflight.check_home(afile, writable=False)
    with pytest.raises(HomeError, match="is a file"):
        preflight.check_home(afile / "below", writable=True)
    preflight.check_home(tmp_path / "missing" / "home", writable=True)
    assert not (tmp_path / "missing").exists()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"model_type": "gpt2"', "not valid JSON"),
        ("[1, 2]", "JSON list"),
        ('{"n_layer": 2}', "model_type"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_a_broken_config_json_names_the_file(tmp_path, content, says):
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ModelConfigError, match=says) as exc:
        config_json(ResolvedModel("m", tmp_path, builtin=False))
    assert str(path) in str(exc.value)


def test_builtin_shape_builds_nothing(tmp_path):
    shape = model_shape("builtin:tiny-gpt2", tmp_path / "home")
    assert (shape.layers, shape.hidden, shape.heads, shape.positions) == (2, 64, 2, 256)
    assert not (tmp_path / "home").exists()
