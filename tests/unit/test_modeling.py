"""Model resolution (offline only), tokenizer/model loading, LoRA config and parameter counts."""

import json
import shutil
import time

import peft
import pytest
import torch

from ckptflow.builtin import TINY_GPT2, materialize_tiny_gpt2
from ckptflow.errors import ModelNotFoundError
from ckptflow.modeling import (
    ResolvedModel,
    count_parameters,
    load_base_model,
    load_tokenizer,
    lora_config,
    resolve_model,
)
from ckptflow.settings import ModelSettings


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    materialize_tiny_gpt2(home)
    return home


@pytest.fixture
def tiny(tiny_home):
    return resolve_model(TINY_GPT2, tiny_home)


def test_resolve_builtin(tiny, tiny_home):
    assert tiny.name == TINY_GPT2 and tiny.builtin
    assert tiny.path.parent == tiny_home / "builtin"
    assert (tiny.path / "config.json").is_file()


def test_resolve_local_directory(tiny, tmp_path, monkeypatch):
    local = tmp_path / "my-model"
    shutil.copytree(tiny.path, local)
    monkeypatch.chdir(tmp_path)
    for name in (str(local), "./my-model", "my-model"):
        resolved = resolve_model(name, tmp_path / "home")
        assert resolved == ResolvedModel(name=name, path=local.resolve(), builtin=False)


def test_local_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"has no config\.json"):
        resolve_model(str(tmp_path / "empty"), tmp_path)


@pytest.mark.parametrize("name", ["./nope", "/nonexistent/model", "~/ckptflow-no-such-model", "a/b/c"])
def test_missing_path_is_directory_not_found(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError, match="directory not found"):
        resolve_model(name, tmp_path)


@pytest.mark.parametrize("name", ["ckptflow-test/definitely-not-a-model-7f3a", "gpt2-nonexistent-xyz"])
def test_unknown_hub_id_fails_fast_offline(name, tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(name, tmp_path)
    assert time.perf_counter() - start < 5
    msg = str(info.value)
    assert f"model '{name}' is not a local directory and not in the local Hugging Face cache (HF_HOME=" in msg
    assert "this machine is offline" in msg and "CKPTFLOW_MODEL__NAME_OR_PATH" in msg and TINY_GPT2 in msg


def test_hub_id_found_in_local_cache(tiny, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    shutil.copytree(tiny.path, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    resolved = resolve_model("acme/tiny", tmp_path)
    assert resolved == ResolvedModel(name="acme/tiny", path=snapshot, builtin=False)
    assert load_tokenizer(resolved).eos_token == "<|endoftext|>"


def test_unknown_builtin(tmp_path):
    with pytest.raises(ModelNotFoundError, match="known built-in models are builtin:tiny-gpt2, builtin:bench-gpt2"):
        resolve_model("builtin:nope", tmp_path)


def test_load_tokenizer_falls_back_to_eos_for_pad(tiny, tmp_path):
    local = tmp_path / "nopad"
    shutil.copytree(tiny.path, local)
    cfg_path = local / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("pad_token")
    cfg_path.write_text(json.dumps(cfg))
    tok = load_tokenizer(resolve_model(str(local), tmp_path))
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_load_base_model(tiny, dtype):
    model = load_base_model(tiny) if dtype is None else load_base_model(tiny, dtype=dtype)
    assert next(model.parameters()).dtype == (dtype or torch.float32)
    assert model.config.model_type == "gpt2"


@pytest.mark.parametrize(
    ("targets", "expected"), [(None, None), ([], None), (["c_attn", "c_proj"], {"c_attn", "c_proj"})]
)
def test_lora_config(targets, expected):
    cfg = lora_config(ModelSettings(lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_target_modules=targets))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.bias) == (4, 8, 0.1, "none")
    assert cfg.task_type == "CAUSAL_LM"
    assert (set(cfg.target_modules) if cfg.target_modules else None) == expected


@pytest.mark.parametrize("targets", [None, ["c_attn", "c_proj"]])
def test_count_parameters_matches_a_real_peft_model(tiny, targets):
    settings = ModelSettings(lora_target_modules=targets)
    rng_before = torch.get_rng_state()
    total, trainable = count_parameters(tiny, settings)
    assert torch.equal(torch.get_rng_state(), rng_before)
    real = peft.get_peft_model(load_base_model(tiny), lora_config(settings))
    assert (trainable, total) == real.get_nb_trainable_parameters()
    assert 0 < trainable < total
