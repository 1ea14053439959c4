"""Warm chunks: what a run's chunks share stays loaded in the training process from one chunk to the next.

A chunk must build its own PEFT wrapper and trainer (`get_peft_model` rewrites the model it
wraps; optimizer, scheduler and RNG state come from the checkpoint), but the tokenizer and
the tokenized datasets are the same for every chunk of a run. They are kept for one run at a
time, keyed by everything that determines them, and dropped when the run's last chunk
starts or another run's chunk comes. So are the datasets as TRL prepared them for the run's
first trainer (`SFTTrainer._prepare_dataset`: EOS, truncation, labels; ~15 `Dataset.map` /
`filter` passes, 25-30 ms per chunk on the benchmark's data): TRL's preparation is a function
of the data, the tokenizer and the run's `SFTConfig`, all fixed for the run, so later chunks
pass the prepared datasets with `skip_prepare_dataset` (TRL's own switch for exactly this).

The base model is built fresh for every chunk, from its files (the page cache keeps them
warm): measured on the benchmark model, `from_pretrained` takes 0.02-0.03 s, rebuilding it
from an in-memory state dict just as long, and `copy.deepcopy` of a pristine model 0.14 s,
so a cached model would cost memory (a second copy of the weights) and save nothing. A fresh
model also cannot carry LoRA layers from the previous chunk, and loading it consumes no RNG
that matters: TRL seeds (`set_seed(args.seed)`) before `get_peft_model` initializes LoRA.

What made an extra chunk slow in a warm process was the full garbage collection that
accelerate runs at the start of every `trainer.train()` (`free_memory`): it walks every
object of the process (torch, transformers, TRL, Prefect: ~570k objects, 0.27 s; the bare
script pays it once). When a run's first chunk in a process has loaded its inputs, `gc.freeze()`
moves the long-lived objects out of the collector's way — even for a one-chunk run. The first
time in a process there is no collection first (it would cost the same 0.27 s, and the garbage
it would free is import-time and meta-device models, kept until the unfreeze); later runs in the
same process collect first, so an earlier run's model or optimizer left in a reference cycle is
freed, not frozen for a whole run. Objects created later are still collected as before, and
everything is unfrozen (`gc.unfreeze()`) after the run's last chunk or when the next run
starts, so nothing stays exempt for good.
"""

from __future__ import annotations

import gc
import hashlib
import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckptflow.data import PreparedData
    from ckptflow.modeling import ResolvedModel
    from ckptflow.settings import Settings

__all__ = ["ChunkInputs", "TrainerDatasets", "chunk_inputs", "keep_prepared", "release", "warm_key"]


@dataclass(frozen=True)
class ChunkInputs:
    """What one chunk trains with: the base model is its own, the rest may be shared with other chunks of the run."""

    resolved: ResolvedModel
    tokenizer: Any
    data: PreparedData
    model: Any
    warm: bool  # tokenizer and data came from the previous chunk of the run
    prepared: TrainerDatasets | None  # TRL's prepared datasets from an earlier chunk of the run, if kept


@dataclass(frozen=True)
class TrainerDatasets:
    """The train and eval datasets as a run's first `SFTTrainer` prepared them (`trainer.train_dataset`, ...)."""

    train: Any
    eval: Any


@dataclass
class _Shared:
    key: str
    resolved: ResolvedModel
    tokenizer: Any
    data: PreparedData
    prepared: TrainerDatasets | None = None


_lock = threading.Lock()  # chunks of different runs may train in threads of one process
_shared: _Shared | None = None
_frozen = False  # this module froze the collector's objects (and must unfreeze them)
_froze_before = False  # an earlier run in this process was frozen: its garbage may be large


def warm_key(settings: Settings, ledger_url: str, run_name: str) -> str:
    """What determines a run's tokenizer and data: the run (ledger and name) and its whole settings.

    The run pins its data (reopening it with other data is refused), so within one run the
    files do not change under a warm chunk; any other settings or run starts cold.
    """
    document = json.dumps([ledger_url, run_name, settings.to_json()], sort_keys=True, default=str)
    return hashlib.sha256(document.encode()).hexdigest()


def chunk_inputs(settings: Settings, key: str, *, keep: bool) -> ChunkInputs:
    """The chunk's tokenizer and data (from the previous chunk of the run when `key` matches) and a fresh base model.

    `keep`: another chunk of the run follows in this process; False for the run's last chunk
    (it takes the shared inputs, nothing is kept after it) and under torchrun (a process per chunk).
    """
    global _shared
    from ckptflow import modeling

    with _lock:
        shared, warm = (_shared, True) if _shared is not None and _shared.key == key else (None, False)
        if shared is None:
            _release_locked()
            shared = _load(settings, key)
            _freeze_long_lived()  # before this chunk's model and trainer exist: they must stay collectable
        # Not kept for the run's last chunk; objects stay frozen through its train(): see release().
        _shared = shared if keep else None
    model = modeling.load_base_model(shared.resolved)
    return ChunkInputs(shared.resolved, shared.tokenizer, shared.data, model, warm, shared.prepared)


def keep_prepared(key: str, prepared: TrainerDatasets) -> None:
    """Keep what TRL prepared for the run `key`'s trainer for its next chunks (nothing, if the run is not kept)."""
    with _lock:
        if _shared is not None and _shared.key == key and _shared.prepared is None:
            _shared.prepared = prepared


def release() -> None:
    """Drop what the chunks of the current run share and give the collector its objects back.

    The in-process launcher calls it after a run's last chunk; otherwise the next run's first
    chunk does it (so the last chunk's `train()` still starts with a cheap collection).
    """
    with _lock:
        _release_locked()


def _load(settings: Settings, key: str) -> _Shared:
    from ckptflow import pipeline

    resolved, tokenizer, data = pipeline.load_inputs(settings)
    return _Shared(key, resolved, tokenizer, data)


def _release_locked() -> None:
    global _shared, _frozen
    _shared = None
    if _frozen:
        gc.unfreeze()
        _frozen = False


def _freeze_long_lived() -> None:
    """Exempt every object alive now from later collections (see the module docstring)."""
    global _frozen, _froze_before
    if _froze_before:
        gc.collect()
    gc.freeze()
    _froze_before = True
    _frozen = True
