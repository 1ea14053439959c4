"""Built-in tiny GPT-2 and demo datasets: deterministic, cached atomically, loadable by plain transformers."""

import json
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from ckptflow.builtin import (
    BENCH_GPT2,
    DEMO_EVAL,
    DEMO_TRAIN,
    TINY_GPT2,
    builtin_texts,
    demo_large_texts,
    materialize_builtin,
    materialize_tiny_gpt2,
)
from ckptflow.builtin import tiny_gpt2
from ckptflow.errors import ModelNotFoundError

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The default tiny model, built once for this module."""
    return materialize_tiny_gpt2(tmp_path_factory.mktemp("home"))


def test_demo_texts_are_the_classic_tutorial():
    assert DEMO_TRAIN == (
        "The quick brown fox jumps over the lazy dog",
        "Machine learning requires large datasets",
        "Checkpoints enable training recovery",
        "Fine-tuning adapts pretrained models",
    )
    assert DEMO_EVAL == ("Fine-tuning is useful for domain adaptation", "Checkpoints save training state")
    assert builtin_texts("builtin:demo") == (list(DEMO_TRAIN), list(DEMO_EVAL))


def test_demo_large_is_deterministic_and_sized():
    train, eval_ = demo_large_texts()
    assert (len(train), len(eval_)) == (512, 32)
    assert (train, eval_) == demo_large_texts()
    assert builtin_texts("builtin:demo-large") == (train, eval_)
    assert len(set(train)) > 200  # varied enough for multi-chunk runs
    assert builtin_texts("builtin:nope") is None


def test_materialize_layout_and_plain_transformers_load(built):
    assert built.name.startswith("tiny-gpt2-") and built.parent.name == "builtin"
    for name in MODEL_FILES:
        assert (built / name).is_file(), name
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".tmp")]

    tok = AutoTokenizer.from_pretrained(built)
    model = AutoModelForCausalLM.from_pretrained(built)
    assert tok.eos_token == tok.bos_token == tok.pad_token == tok.unk_token == "<|endoftext|>"
    assert 500 <= len(tok) <= 1000
    assert model.config.vocab_size == len(tok)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head, model.config.n_positions) == (2, 64, 2, 256)
    assert model.config.eos_token_id == tok.eos_token_id


@pytest.mark.parametrize("text", ["The quick brown fox", "Ünïcödé ✓ 🦊 中文", "tabs\tand\nnewlines  "])
def test_tokenizer_encodes_any_text_losslessly(built, text):
    tok = AutoTokenizer.from_pretrained(built)
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


def test_build_is_byte_identical_across_homes(built, tmp_path):
    again = materialize_tiny_gpt2(tmp_path / "other-home")
    assert again.name == built.name
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (built / name).read_bytes(), name


def test_warm_call_reuses_the_cache(built):
    home = built.parent.parent
    mtime = (built / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert materialize_tiny_gpt2(home) == built
    assert time.perf_counter() - start < 0.5
    assert (built / "model.safetensors").stat().st_mtime_ns == mtime


def test_overrides_change_digest_and_config(tmp_path):
    assert tiny_gpt2.recipe_digest({}) != tiny_gpt2.recipe_digest({"n_layer": 1})
    path = materialize_tiny_gpt2(tmp_path, n_layer=1, n_embd=32)
    config = json.loads((path / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_head"]) == (1, 32, 2)
    assert path.name == f"tiny-gpt2-{tiny_gpt2.recipe_digest({'n_layer': 1, 'n_embd': 32})}"


def test_concurrent_builder_that_finishes_first_wins(tmp_path, monkeypatch):
    """Another builder renames its result into place while we build: ours is discarded, theirs kept."""
    real_build = tiny_gpt2._build
    calls = []

    def racing_build(out_dir, config_fields):
        real_build(out_dir, config_fields)
        if not calls:
            calls.append(out_dir)
            materialize_tiny_gpt2(tmp_path, n_layer=1)  # the "other process" completes first
            (out_dir / "ours").write_text("x")

    monkeypatch.setattr(tiny_gpt2, "_build", racing_build)
    final = materialize_tiny_gpt2(tmp_path, n_layer=1)
    assert final.is_dir() and not (final / "ours").exists()
    assert (final / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "builtin").iterdir()) == [final.name]


def test_materialize_builtin_names(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(tiny_gpt2, "materialize_tiny_gpt2", lambda home, **kw: seen.append(kw) or home)
    materialize_builtin(TINY_GPT2, tmp_path)
    materialize_builtin(BENCH_GPT2, tmp_path)
    assert seen == [{}, {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256}]
    with pytest.raises(ModelNotFoundError, match=r"builtin:tiny-gpt2, builtin:bench-gpt2"):
        materialize_builtin("builtin:gpt2-small-local", tmp_path)
