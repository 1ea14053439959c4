"""Built-in model and datasets: everything a demo or test needs, built offline."""

from ckptflow.builtin.demo import (
    BUILTIN_DATASETS,
    DEMO,
    DEMO_EVAL,
    DEMO_LARGE,
    DEMO_TRAIN,
    builtin_texts,
    demo_large_texts,
)
from ckptflow.builtin.tiny_gpt2 import (
    BENCH_GPT2,
    BUILTIN_MODELS,
    TINY_GPT2,
    materialize_builtin,
    materialize_tiny_gpt2,
)

BUILTIN_PREFIX = "builtin:"

__all__ = [
    "BENCH_GPT2",
    "BUILTIN_DATASETS",
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "DEMO",
    "DEMO_EVAL",
    "DEMO_LARGE",
    "DEMO_TRAIN",
    "TINY_GPT2",
    "builtin_texts",
    "demo_large_texts",
    "materialize_builtin",
    "materialize_tiny_gpt2",
]
