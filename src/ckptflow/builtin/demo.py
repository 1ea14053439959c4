"""Built-in datasets: the classic checkpoint-tutorial texts and a larger synthetic set.

Everything here is plain data generated in-process (no downloads), so tests, demos and
benchmarks run offline and reproducibly. `ENGLISH_CORPUS` also feeds the tokenizer of
`builtin:tiny-gpt2`.
"""

from __future__ import annotations

import random

DEMO = "builtin:demo"
DEMO_LARGE = "builtin:demo-large"

# The 4 train / 2 eval texts of the classic HF checkpoint demo (2 epochs, batch 2 → 4 steps).
DEMO_TRAIN: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog",
    "Machine learning requires large datasets",
    "Checkpoints enable training recovery",
    "Fine-tuning adapts pretrained models",
)
DEMO_EVAL: tuple[str, ...] = (
    "Fine-tuning is useful for domain adaptation",
    "Checkpoints save training state",
)

# Generic English / ML prose: extra tokenizer training text so common words get merges.
ENGLISH_CORPUS: tuple[str, ...] = (
    "A language model predicts the next token from the tokens that came before it.",
    "Training minimizes the cross-entropy loss between predictions and the real text.",
    "The learning rate controls how far each optimizer step moves the weights.",
    "A checkpoint stores the model weights, the optimizer state and the current step.",
    "If the machine crashes, training resumes from the newest checkpoint on disk.",
    "Low-rank adaptation trains small matrices while the base weights stay frozen.",
    "Evaluation measures the loss on held-out data that the model never trained on.",
    "Perplexity is the exponential of the average loss per token.",
    "A tokenizer splits text into pieces and maps every piece to an integer id.",
    "Byte-level encoding means that any string can be represented without unknown tokens.",
    "The batch size is the number of examples processed in one forward pass.",
    "Gradient accumulation adds up gradients over several small batches before a step.",
    "One epoch is a full pass over the training data.",
    "Overfitting happens when the model memorizes the training set instead of generalizing.",
    "Early stopping keeps the checkpoint with the best validation score.",
    "A scheduler lowers the learning rate as training goes on.",
    "Random seeds make experiments reproducible from one run to the next.",
    "The weather today is sunny with a light breeze from the west.",
    "She opened the window and listened to the birds in the garden.",
    "He wrote a short letter to his friend and walked to the post office.",
    "The library was quiet except for the sound of turning pages.",
    "Our team meets every Monday morning to plan the work of the week.",
    "The train to the city leaves at half past eight every day.",
    "Good documentation explains why a decision was made, not only what it does.",
    "Small models are fast to train and useful for testing a pipeline end to end.",
    "Data cleaning removes empty rows, duplicates and broken records.",
    "A workflow runs tasks in order and retries the ones that fail.",
    "Disk space is limited, so old checkpoints are deleted by a retention policy.",
    "The best model is chosen by the lowest evaluation loss.",
    "Export writes the merged weights in a format that other tools can load.",
    "Children played football in the park until the sun went down.",
    "The recipe asks for two cups of flour, one egg and a pinch of salt.",
    "Mountains rise above the valley where the river slowly winds.",
    "Please save your work often so that nothing is lost.",
    "Attention lets each position in a sequence look at every earlier position.",
    "Embeddings turn token ids into vectors that the network can process.",
    "A transformer stacks layers of attention and feed-forward blocks.",
    "Dropout randomly zeroes activations to make the network more robust.",
    "The validation set is used to compare checkpoints and pick the best one.",
    "Reproducible training gives the same weights when run twice with the same seed.",
)

# -- demo-large: deterministic template sentences -----------------------------------------
DEMO_LARGE_TRAIN_ROWS = 512
DEMO_LARGE_EVAL_ROWS = 32
DEMO_LARGE_SEED = 1234

_SUBJECTS = (
    "The model", "A small network", "The trainer", "Our pipeline", "The optimizer", "The tokenizer",
    "A researcher", "The engineer", "The scheduler", "The evaluation job", "The checkpoint manager",
    "A student", "The workflow", "The data loader", "The fox", "The team",
)
_VERBS = (
    "learns", "saves", "reads", "updates", "evaluates", "predicts", "compares", "restores",
    "writes", "measures", "tokenizes", "selects", "prunes", "exports", "loads", "checks",
)
_OBJECTS = (
    "the training data", "a new checkpoint", "the next token", "the validation loss", "the best weights",
    "every batch", "the learning rate", "a short sentence", "the adapter weights", "the optimizer state",
    "a long document", "the eval set", "the lazy dog", "the model card", "the manifest", "the ledger",
)
_ENDINGS = (
    "after every step", "before the run ends", "when the job restarts", "at the end of each epoch",
    "on a single CPU", "without any network access", "in a few seconds", "with a fixed seed",
    "to recover from a crash", "so that nothing is lost", "for the next experiment", "every two steps",
)


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ENDINGS)}."


def demo_large_texts(
    train_rows: int = DEMO_LARGE_TRAIN_ROWS, eval_rows: int = DEMO_LARGE_EVAL_ROWS, seed: int = DEMO_LARGE_SEED
) -> tuple[list[str], list[str]]:
    """(train, eval) template sentences; the same arguments always give the same lists."""
    rng = random.Random(seed)
    train = [_sentence(rng) for _ in range(train_rows)]
    eval_ = [_sentence(rng) for _ in range(eval_rows)]
    return train, eval_


BUILTIN_DATASETS = (DEMO, DEMO_LARGE)


def builtin_texts(name: str) -> tuple[list[str], list[str]] | None:
    """(train, eval) of a built-in dataset, or None if `name` is not one."""
    if name == DEMO:
        return list(DEMO_TRAIN), list(DEMO_EVAL)
    if name == DEMO_LARGE:
        return demo_large_texts()
    return None
