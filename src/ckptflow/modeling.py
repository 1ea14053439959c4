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
from ckptflow.errors import ModelNotFoundError

if TYPE_CHECKING:
    import peft
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ckptflow.settings import ModelSettings

CONFIG_FILE = "config.json"  # what makes a directory a model directory
_FIX_HINT = f"set CKPTFLOW_MODEL__NAME_OR_PATH to a local directory or {TINY_GPT2}"


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
