"""`ckptflow plan`: measure the inputs (data size, parameter counts, free disk) and ask planning.py."""

from __future__ import annotations

import shutil

from ckptflow.planning import Plan, estimate_checkpoint_bytes, make_plan
from ckptflow.runs import total_steps
from ckptflow.settings import Settings, steps_per_epoch


# Files of a tokenizer that HF saves beside the weights.
_TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens")
# rng_state, scheduler, trainer_state, training_args, adapter config and card of an HF checkpoint.
_HF_STATE_BYTES = 40 * 1024


def plan_for_settings(settings: Settings, *, at_step: int | None = None) -> Plan:
    """The plan a run with these settings would follow; loads data and model config, trains nothing."""
    from ckptflow.modeling import count_parameters, resolve_model
    from ckptflow.pipeline import prepare

    prepared = prepare(settings)
    resolved = resolve_model(settings.model.name_or_path, settings.home)
    _, trainable = count_parameters(resolved, settings.model)
    # HF copies the tokenizer files into every checkpoint.
    tokenizer_bytes = sum(p.stat().st_size for p in resolved.path.glob("*") if p.name.startswith(_TOKENIZER_FILES))
    settings.home.mkdir(parents=True, exist_ok=True)
    return make_plan(
        settings.checkpoint,
        total_steps=total_steps(settings, prepared.train_rows),
        steps_per_epoch=steps_per_epoch(
            prepared.train_rows,
            settings.train.batch_size,
            settings.train.gradient_accumulation_steps,
            settings.train.world_size,  # DDP: an epoch is counted in global batches
        ),
        chunk_steps=settings.train.chunk_steps,
        bytes_per_checkpoint=estimate_checkpoint_bytes(trainable, extra_bytes=_HF_STATE_BYTES + tokenizer_bytes),
        free_bytes=shutil.disk_usage(settings.home).free,
        at_step=at_step,
    )
