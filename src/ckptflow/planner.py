"""`ckptflow plan`: measure the inputs (data size, parameter counts, free disk) and ask planning.py.

Read-only: it tokenizes nothing, writes no cache and creates no home; a built-in model that
is not built yet is built in a temporary directory and thrown away.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ckptflow.errors import ConfigError
from ckptflow.planning import Plan, estimate_checkpoint_bytes, make_plan, schedule_for
from ckptflow.runs import total_steps
from ckptflow.settings import Settings

# Files of a tokenizer that HF saves beside the weights.
_TOKENIZER_FILES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens")
# rng_state, scheduler, trainer_state, training_args, adapter config and card of an HF checkpoint.
_HF_STATE_BYTES = 40 * 1024


def plan_for_settings(settings: Settings, *, at_step: int | None = None) -> Plan:
    """The plan a run with these settings would follow; reads data and model config, trains and writes nothing.

    Raises ConfigError when `at_step` is not a step of the run (1..total steps).
    """
    from ckptflow.data import split_sizes
    from ckptflow.modeling import count_parameters
    from ckptflow.preflight import check_scale

    sizes = split_sizes(settings.data, settings.train.seed)
    total = total_steps(settings, sizes.train_rows)
    check_scale(settings, total)
    if at_step is not None and not 1 <= at_step <= total:
        raise ConfigError(f"--at {at_step} is not a step of this run (it has steps 1 to {total}): pass --at between 1 and {total}")
    with _model_dir(settings) as resolved:
        _, trainable = count_parameters(resolved, settings.model)
        # HF copies the tokenizer files into every checkpoint.
        tokenizer_bytes = sum(p.stat().st_size for p in resolved.path.glob("*") if p.name.startswith(_TOKENIZER_FILES))
    # The same schedule the flow trains by and every chunk's trainer saves and evaluates by.
    schedule = schedule_for(settings, total_steps=total, train_rows=sizes.train_rows)
    return make_plan(
        settings.checkpoint,
        schedule,
        bytes_per_checkpoint=estimate_checkpoint_bytes(trainable, extra_bytes=_HF_STATE_BYTES + tokenizer_bytes),
        free_bytes=shutil.disk_usage(_nearest_existing(settings.home)).free,
        at_step=at_step,
    )


@contextmanager
def _model_dir(settings: Settings) -> Iterator:
    """The resolved model; a built-in one not yet in the home is built in a temporary directory."""
    from ckptflow.builtin import BUILTIN_PREFIX
    from ckptflow.builtin.tiny_gpt2 import BUILTIN_DIR
    from ckptflow.modeling import resolve_model

    name = settings.model.name_or_path
    home = settings.home
    if name.startswith(BUILTIN_PREFIX) and not _built(home / BUILTIN_DIR, name):
        with tempfile.TemporaryDirectory(prefix="ckptflow-plan-") as tmp:
            yield resolve_model(name, Path(tmp))
        return
    yield resolve_model(name, home)


def _built(root: Path, name: str) -> bool:
    """Whether the built-in model `name` is already materialized under `root` (then resolving writes nothing)."""
    from ckptflow.builtin import BUILTIN_MODELS
    from ckptflow.builtin.tiny_gpt2 import RECIPE_FILE, recipe_digest

    if name not in BUILTIN_MODELS:
        return False
    return (root / f"tiny-gpt2-{recipe_digest(BUILTIN_MODELS[name])}" / RECIPE_FILE).is_file()


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
