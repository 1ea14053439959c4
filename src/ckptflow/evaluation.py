"""Eval loss and perplexity of a model on the run's eval set, computed exactly as training's evaluation.

The same trainer class, collator and batch size as training, so the number for a
checkpoint equals the `eval_loss` recorded when it was saved.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from ckptflow.settings import Settings

# Keys of an evaluation result.
EVAL_LOSS = "eval_loss"
PERPLEXITY = "perplexity"


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def evaluate_model(model: Any, eval_dataset: Any, tokenizer: Any, settings: Settings) -> dict[str, float]:
    """{"eval_loss", "perplexity"} of `model` (a plain or PEFT model) on a pre-tokenized eval set.

    Uses SFTTrainer itself (same collator, loss and token weighting as training's eval), so
    the number equals the eval_loss recorded when the checkpoint was saved.
    """
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from ckptflow.training import TrainerSpec, sft_config

    with tempfile.TemporaryDirectory(prefix="ckptflow-eval-") as tmp:
        trainer = SFTTrainer(
            model=model,
            args=sft_config(TrainerSpec(Path(tmp), 1, settings)),
            train_dataset=eval_dataset,  # required by SFTTrainer; evaluate() never reads it
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)
        metrics = trainer.evaluate()
    loss = float(metrics[EVAL_LOSS])
    return {EVAL_LOSS: loss, PERPLEXITY: perplexity(loss)}


def evaluate_checkpoint(base_model: Any, checkpoint: Path, eval_dataset: Any, tokenizer: Any, settings: Settings) -> dict[str, float]:
    """Load the LoRA adapter saved in `checkpoint` onto `base_model` and evaluate it."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(checkpoint))
    return evaluate_model(model, eval_dataset, tokenizer, settings)
