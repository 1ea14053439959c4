"""What an export says about itself: the exported step's metrics, and nothing about the training machine."""

from __future__ import annotations

import pytest

from ckptflow.export import portable_name
from ckptflow.pipeline import export_metrics


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("builtin:tiny-gpt2", "builtin:tiny-gpt2"),
        ("gpt2", "gpt2"),
        ("org/model-name", "org/model-name"),
        ("/srv/models/llama-7b", "local:llama-7b"),
        ("./models/mine", "local:mine"),
        ("../data/train.jsonl", "local:train.jsonl"),
        ("builtin:demo", "builtin:demo"),
        ("", ""),
    ],
)
def test_portable_name(name, shown):
    assert portable_name(name) == shown


EVALUATION = {"base_eval_loss": 6.9, "best_step": 4, "best_eval_loss": 6.8, "best_perplexity": 900.0, "notes": []}


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        (4, {"eval_loss": 6.81, "base_eval_loss": 6.9, "best_step": 4, "best_eval_loss": 6.8, "best_perplexity": 900.0}),
        (2, {"eval_loss": 6.81, "base_eval_loss": 6.9}),  # step 2's card never claims "best_step 4"
    ],
)
def test_export_metrics_describe_the_exported_step(step, expected):
    assert export_metrics(step, {"eval_loss": 6.81}, EVALUATION) == expected
