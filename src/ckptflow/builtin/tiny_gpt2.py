"""Built-in tiny GPT-2: built locally (no downloads), deterministic, cached under the home.

The model is a `GPT2LMHeadModel` from a fixed config with weights initialised from a fixed
seed; the tokenizer is a byte-level BPE trained with `tokenizers` on the built-in corpus,
so any text encodes. Building twice gives byte-identical `model.safetensors` and
`tokenizer.json`. The result is an ordinary HF model directory: plain
`AutoModelForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)` load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ckptflow.builtin.demo import DEMO_EVAL, DEMO_TRAIN, ENGLISH_CORPUS, demo_large_texts
from ckptflow.errors import ModelNotFoundError
from ckptflow.paths import contained

TINY_GPT2 = "builtin:tiny-gpt2"
BENCH_GPT2 = "builtin:bench-gpt2"

# Bump when the build recipe changes in a way the digest cannot see (new cache directory).
RECIPE_VERSION = 1
# Directory under $CKPTFLOW_HOME holding materialized built-in models.
BUILTIN_DIR = "builtin"
# Written last into a built model dir: the recipe that produced it.
RECIPE_FILE = "ckptflow-builtin.json"

EOS_TOKEN = "<|endoftext|>"  # bos = eos = pad = unk, as in GPT-2
VOCAB_SIZE = 1000  # BPE target; the real size is what the corpus yields (≤ this)
INIT_SEED = 0  # weight initialisation

# Defaults for builtin:tiny-gpt2; GPT2Config fields, overridable per call.
TINY_GPT2_CONFIG: dict[str, Any] = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256}
# builtin:bench-gpt2: a bigger local model for benchmarks.
BENCH_GPT2_CONFIG: dict[str, Any] = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 256}

BUILTIN_MODELS: dict[str, dict[str, Any]] = {TINY_GPT2: {}, BENCH_GPT2: BENCH_GPT2_CONFIG}


def tokenizer_corpus() -> list[str]:
    """The text the built-in tokenizer is trained on (fixed order)."""
    large_train, large_eval = demo_large_texts()
    return [*DEMO_TRAIN, *DEMO_EVAL, *ENGLISH_CORPUS, *large_train, *large_eval]


def _recipe(overrides: dict[str, Any]) -> dict[str, Any]:
    from importlib.metadata import version  # not `import torch`: finding a built model must stay cheap

    corpus_sha = hashlib.sha256("\n".join(tokenizer_corpus()).encode()).hexdigest()
    return {
        "recipe_version": RECIPE_VERSION,
        "config": {**TINY_GPT2_CONFIG, **overrides},
        "vocab_size": VOCAB_SIZE,
        "eos_token": EOS_TOKEN,
        "init_seed": INIT_SEED,
        "corpus_sha256": corpus_sha,
        # Library versions change init / serialization; a new version gets a fresh build.
        "versions": {name: version(name) for name in ("torch", "transformers", "tokenizers")},
    }


def recipe_digest(overrides: dict[str, Any] | None = None) -> str:
    """Short digest of the build recipe: the cache directory suffix."""
    blob = json.dumps(_recipe(dict(overrides or {})), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )


def _build(out_dir: Path, config_fields: dict[str, Any]) -> None:
    """1 train the tokenizer  2 build the config around its vocab  3 init weights from INIT_SEED  4 save."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    tokenizer = _train_tokenizer()
    tokenizer.model_max_length = int(config_fields["n_positions"])
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        **config_fields,
    )
    with torch.random.fork_rng(devices=[]):  # don't disturb the caller's RNG
        torch.manual_seed(INIT_SEED)
        model = GPT2LMHeadModel(config)
    model.eval()
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


def materialize_tiny_gpt2(home: Path, **overrides: Any) -> Path:
    """Build (once) and return the directory of the tiny GPT-2 with GPT2Config `overrides`.

    Cached at `<home>/builtin/tiny-gpt2-<digest>/`. The build goes to a temporary directory
    that is renamed into place; if another process got there first, its result is kept
    and ours discarded, so concurrent builders never see a half-written model.
    """
    recipe = _recipe(overrides)
    digest = recipe_digest(overrides)
    root = contained(Path(home), BUILTIN_DIR)  # never outside the home, whatever CKPTFLOW_HOME holds
    final = contained(root, f"tiny-gpt2-{digest}")
    if (final / RECIPE_FILE).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-tiny-gpt2-{digest}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _build(tmp, recipe["config"])
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / RECIPE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def materialize_builtin(name: str, home: Path) -> Path:
    """Directory of the built-in model `name` (`builtin:tiny-gpt2`, `builtin:bench-gpt2`)."""
    if name not in BUILTIN_MODELS:
        raise ModelNotFoundError(
            f"unknown built-in model {name!r}: known built-in models are {', '.join(BUILTIN_MODELS)}; "
            "change CKPTFLOW_MODEL__NAME_OR_PATH"
        )
    return materialize_tiny_gpt2(home, **BUILTIN_MODELS[name])
