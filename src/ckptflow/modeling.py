"""Resolve the base model and tokenizer (offline only), build the LoRA config, count parameters.

Nothing here touches the network: a model is built in (`builtin:*`), a local directory, or
a hub id that is already in the local Hugging Face cache.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ckptflow.builtin import BUILTIN_PREFIX, TINY_GPT2, materialize_builtin
from ckptflow.errors import BadInputError, ModelNotFoundError

if TYPE_CHECKING:
    import peft
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from ckptflow.settings import ModelSettings

CONFIG_FILE = "config.json"  # what makes a directory a model directory
_FIX_HINT = f"set CKPTFLOW_MODEL__NAME_OR_PATH to a local directory or {TINY_GPT2}"
# Bytes per float32 value: weights, activations and logits are fp32 in training here.
_FP32 = 4
# Live copies of the logits per token during a step: logits, log-softmax, and their gradients.
_LOGIT_COPIES = 4
# Activation bytes per token per layer are about (34·hidden + 5·heads·seq) at 16 bit
# (Korthikanti et al., "Reducing Activation Recomputation"); ×2 for fp32.
_ACT_HIDDEN, _ACT_ATTN, _ACT_FP32 = 34, 5, 2
# A Python list slot per index in torch's BatchSampler, one list per dataloader (train, eval).
_INDEX_BYTES, _DATALOADERS = 8, 2


class ModelConfigError(BadInputError):
    """The model's config.json cannot be read or does not describe a model transformers knows."""


class LoraTargetError(BadInputError):
    """lora_target_modules match no module of the base model."""


@dataclass(frozen=True)
class ResolvedModel:
    """A base model found locally. `name` is as the user gave it; `path` holds config + tokenizer."""

    name: str
    path: Path
    builtin: bool


def _looks_like_path(name: str) -> bool:
    """A filesystem path rather than a hub id (`org/model` has exactly one `/`)."""
    if name.startswith(("/", ".", "~")):
        return True
    return name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _local_dir(name: str, path: Path) -> ResolvedModel:
    if not path.is_dir():
        raise ModelNotFoundError(f"model directory not found: {name!r} ({path.absolute()} is not a directory); {_FIX_HINT}")
    if not (path / CONFIG_FILE).is_file():
        raise ModelNotFoundError(
            f"model directory {path} has no {CONFIG_FILE}: it is not a Hugging Face model directory "
            f"(save one with model.save_pretrained(dir)); {_FIX_HINT}"
        )
    return ResolvedModel(name=name, path=path.resolve(), builtin=False)


def _from_hf_cache(name: str) -> ResolvedModel:
    from huggingface_hub import constants, snapshot_download

    try:
        snapshot = Path(snapshot_download(name, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError (bad id), offline errors
        raise ModelNotFoundError(
            f"model {name!r} is not a local directory and not in the local Hugging Face cache "
            f"(HF_HOME={constants.HF_HOME}); this machine is offline: download it elsewhere into the cache, "
            f"or {_FIX_HINT}"
        ) from exc
    if not (snapshot / CONFIG_FILE).is_file():
        raise ModelNotFoundError(
            f"model {name!r} is in the local Hugging Face cache ({snapshot}) but has no {CONFIG_FILE}; "
            f"download the full model, or {_FIX_HINT}"
        )
    return ResolvedModel(name=name, path=snapshot, builtin=False)


def resolve_model(name_or_path: str, home: Path) -> ResolvedModel:
    """Find the model locally: built in (materialized under `home`), a directory, or the HF cache.

    Raises ModelNotFoundError saying what is missing and what to set; never downloads.
    """
    name = name_or_path.strip()
    if name.startswith(BUILTIN_PREFIX):
        return ResolvedModel(name=name, path=materialize_builtin(name, Path(home)), builtin=True)
    path = Path(name).expanduser()
    if path.exists() or _looks_like_path(name):
        return _local_dir(name, path)
    return _from_hf_cache(name)


def load_tokenizer(resolved: ResolvedModel) -> PreTrainedTokenizerBase:
    """The model's tokenizer; pad_token falls back to eos_token (as SFTTrainer does)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolved.path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(resolved: ResolvedModel, *, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The base causal LM (float32 unless `dtype` says otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        resolved.path, local_files_only=True, dtype=dtype if dtype is not None else torch.float32
    )


def lora_config(model: ModelSettings) -> peft.LoraConfig:
    """PEFT LoRA config from the model settings (target modules: PEFT's default when unset)."""
    import peft

    return peft.LoraConfig(
        r=model.lora_r,
        lora_alpha=model.lora_alpha,
        lora_dropout=model.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=list(model.lora_target_modules) if model.lora_target_modules else None,
        modules_to_save=list(model.lora_modules_to_save) if model.lora_modules_to_save else None,
    )


def count_parameters(resolved: ResolvedModel, model_settings: ModelSettings) -> tuple[int, int]:
    """(total, trainable) parameters of the base model wrapped with LoRA, as PEFT counts them.

    Total includes the LoRA weights; shared (tied) tensors count once. Built on the meta
    device: no weights are read or allocated, and the caller's RNG is left untouched.
    """
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolved.path, local_files_only=True)
    with torch.random.fork_rng(devices=[]), torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's Conv1D fan_in_fan_out notice etc.: not the caller's concern
        model = AutoModelForCausalLM.from_config(config)
        peft_model = peft.get_peft_model(model, lora_config(model_settings))
    trainable, total = peft_model.get_nb_trainable_parameters()
    return int(total), int(trainable)


# -- preflight: what can be checked from the config alone ------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide a training step's memory, read from config.json alone."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    positions: int | None


# config.json keys of each size, in the spellings of common architectures (first present wins).
_SHAPE_KEYS = {
    "vocab": ("vocab_size",),
    "hidden": ("hidden_size", "n_embd", "d_model", "dim"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "positions": ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"),
}


def config_json(resolved: ResolvedModel) -> dict:
    """The model's config.json as a dict with a model_type; ModelConfigError naming the file otherwise."""
    import json

    path = resolved.path / CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path} is not valid JSON ({exc}): fix or replace that file, or {_FIX_HINT}") from None
    if not isinstance(config, dict):
        raise ModelConfigError(f"{path} holds a JSON {type(config).__name__}, not an object: fix that file, or {_FIX_HINT}")
    if not isinstance(config.get("model_type"), str):
        raise ModelConfigError(f"{path} has no \"model_type\" (e.g. \"gpt2\"): fix that file, or {_FIX_HINT}")
    return config


def model_shape(name_or_path: str, home: Path) -> ModelShape:
    """Sizes of the base model from its config.json (a built-in one: from its recipe); imports no torch, writes nothing."""
    from ckptflow.builtin import BUILTIN_MODELS
    from ckptflow.builtin.tiny_gpt2 import TINY_GPT2_CONFIG, VOCAB_SIZE

    name = name_or_path.strip()
    if name.startswith(BUILTIN_PREFIX):
        if name not in BUILTIN_MODELS:
            materialize_builtin(name, home)  # raises ModelNotFoundError listing the built-in models
        fields = {**TINY_GPT2_CONFIG, **BUILTIN_MODELS[name], "vocab_size": VOCAB_SIZE}
    else:
        fields = config_json(resolve_model(name, home))

    def size(kind: str) -> int | None:
        value = next((fields[k] for k in _SHAPE_KEYS[kind] if isinstance(fields.get(k), int)), None)
        return int(value) if value is not None else None

    return ModelShape(
        vocab=size("vocab") or 0, hidden=size("hidden") or 0, layers=size("layers") or 0,
        heads=size("heads") or 1, positions=size("positions"),
    )


def model_config(name_or_path: str, home: Path) -> PretrainedConfig:
    """The base model's transformers config, built without downloading or writing anything.

    A built-in model's comes from its recipe. Raises ModelNotFoundError / ModelConfigError
    naming the file and the setting to change.
    """
    from ckptflow.builtin import BUILTIN_MODELS
    from ckptflow.builtin.tiny_gpt2 import TINY_GPT2_CONFIG, VOCAB_SIZE

    name = name_or_path.strip()
    if name.startswith(BUILTIN_PREFIX):
        if name not in BUILTIN_MODELS:
            materialize_builtin(name, home)  # raises ModelNotFoundError listing the built-in models
        from transformers import GPT2Config

        return GPT2Config(vocab_size=VOCAB_SIZE, **{**TINY_GPT2_CONFIG, **BUILTIN_MODELS[name]})
    return read_model_config(resolve_model(name, home))


def read_model_config(resolved: ResolvedModel) -> PretrainedConfig:
    """AutoConfig of a model directory; a broken config.json is a ModelConfigError naming the file."""
    path = resolved.path / CONFIG_FILE
    config_json(resolved)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolved.path, local_files_only=True)
    except Exception as exc:  # ValueError / KeyError for an unknown model_type, missing fields, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelConfigError(
            f"{path} does not describe a model transformers can build ({first}): fix that file, or {_FIX_HINT}"
        ) from None


def _meta_model(config: PretrainedConfig):
    """The causal LM of `config` on the meta device: shapes only, no memory, caller's RNG untouched."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]), torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(config)


def check_lora_targets(config: PretrainedConfig, model_settings: ModelSettings) -> None:
    """Wrap the meta model with LoRA as training will; refuse targets that match nothing (list what exists)."""
    import peft

    try:
        model = _meta_model(config)
    except Exception as exc:
        raise ModelConfigError(f"cannot build a causal LM from the model config ({exc}): {_FIX_HINT}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(model, lora_config(model_settings))
    except ValueError as exc:
        names = ", ".join(adaptable_module_names(model))
        wanted = model_settings.lora_target_modules or "PEFT's default"
        raise LoraTargetError(
            f"lora_target_modules={wanted} match no module of {type(model).__name__} ({str(exc).splitlines()[0]}); "
            f"modules that LoRA can adapt: {names}: set CKPTFLOW_MODEL__LORA_TARGET_MODULES to some of them "
            '(e.g. CKPTFLOW_MODEL__LORA_TARGET_MODULES=\'["c_attn"]\')'
        ) from None


def adaptable_module_names(model) -> list[str]:
    """Distinct last names of the Linear/Conv1D/Embedding modules of `model` (what LoRA targets), sorted."""
    kinds = ("Linear", "Conv1D", "Embedding", "Conv2d")
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if name and type(module).__name__ in kinds}
    return sorted(names)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes of one training step, by part, and the shapes it assumes."""

    weights: int
    activations: int
    logits: int
    sampler: int
    batch: int
    seq: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.logits + self.sampler


def estimate_training_memory(shape: ModelShape, *, batch_size: int, rows: int, max_length: int) -> MemoryEstimate:
    """Upper bound of a training step's memory: fp32 weights + activations + logits at full length.

    A batch holds at most `rows` examples, padded to the longest, never beyond `max_length`
    or the model's positions, so this bounds the real peak from above. torch's BatchSampler
    also preallocates a list of `batch_size` indices per dataloader (train and eval), whatever
    the number of rows: 8 bytes each.
    """
    positions = shape.positions or max_length
    seq = min(max_length, positions)
    batch = min(batch_size, rows)
    params = 12 * shape.layers * shape.hidden**2 + (shape.vocab + positions) * shape.hidden
    per_layer = (_ACT_HIDDEN * shape.hidden + _ACT_ATTN * shape.heads * seq) * _ACT_FP32
    return MemoryEstimate(
        weights=params * _FP32,
        activations=batch * seq * shape.layers * per_layer,
        logits=batch * seq * shape.vocab * _FP32 * _LOGIT_COPIES,
        sampler=batch_size * _INDEX_BYTES * _DATALOADERS,
        batch=batch,
        seq=seq,
    )
