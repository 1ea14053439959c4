"""Baseline: the fine-tune ckptflow wraps, as a bare TRL SFTTrainer script with HF checkpointing.

Same model, data, LoRA config and training arguments as `ckptflow run` with the benchmark
settings. Precision is TRL's default (SFTConfig picks bf16 autocast; nothing overridden), the
script a user would write; `--precision fp32|bf16|fp16` pins one instead (matched-precision
comparisons). The precision trained in is printed as `precision: <p>` on stdout.
HF saves every --save-steps and rotates with save_total_limit (keeping the best by
eval_loss, like `load_best_model_at_end` users do). No ckptflow import anywhere.

    python benchmarks/bare_sft.py --model DIR --data DIR --out DIR --max-steps 300 --save-steps 50
    python benchmarks/bare_sft.py ... --resume-from DIR/checkpoint-150 --stop-after 1
    python benchmarks/bare_sft.py ... --prefect-tasks 9    # the same inside a Prefect flow of 9 task runs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


# --precision → HF's switches; "default" passes neither, so SFTConfig decides (bf16 = not fp16).
# --gradient-checkpointing → HF's switch; "default" leaves SFTConfig's (on, in TRL 1.x).
GRADIENT_CHECKPOINTING_ARGS = {"default": {}, "on": {"gradient_checkpointing": True}, "off": {"gradient_checkpointing": False}}
PRECISION_ARGS = {"fp32": {"bf16": False, "fp16": False}, "bf16": {"bf16": True}, "fp16": {"fp16": True}}


def read_texts(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local model directory (config + weights + tokenizer)")
    p.add_argument("--data", type=Path, required=True, help="directory with train.jsonl and eval.jsonl")
    p.add_argument("--out", required=True, help="output_dir (checkpoints go here)")
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--save-steps", type=int, required=True, help="save and evaluate every N steps")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--save-total-limit", type=int, default=2)
    p.add_argument("--logging-steps", type=int, default=1, help="log every N steps (ckptflow's default is 1)")
    p.add_argument("--resume-from", default=None, help="checkpoint directory to resume from (explicit path)")
    p.add_argument("--stop-after", type=int, default=0, help="stop after this many optimizer steps in this process")
    p.add_argument("--gradient-checkpointing", choices=["default", "on", "off"], default="off",
                   help="off (default): like ckptflow's default; TRL's SFTConfig turns it on (memory for ~1/3 more compute)")  # fmt: skip
    p.add_argument("--precision", choices=["default", *PRECISION_ARGS], default="default",
                   help="default: TRL's choice (no bf16/fp16 argument); else pin HF's bf16/fp16 switches")  # fmt: skip
    p.add_argument("--prefect-tasks", type=int, default=0,
                   help="N > 0: the same script as a Prefect flow of N task runs (N-1 empty ones, then one that "
                        "trains): what Prefect alone costs a TRL script, with no ckptflow")  # fmt: skip
    args = p.parse_args()
    if args.prefect_tasks > 0:
        run_as_prefect_flow(args)
    else:
        train(args)


def run_as_prefect_flow(args: argparse.Namespace) -> None:
    """`train` inside a Prefect flow (the server is PREFECT_API_URL's, or Prefect's temporary one)."""
    from prefect import flow, task

    @task
    def step() -> None:
        """An empty task run: one more task run's API calls and states, as a ckptflow run has."""

    @task
    def train_task() -> None:
        train(args)

    @flow(name="bare-sft")
    def bare_sft() -> None:
        for _ in range(args.prefect_tasks - 1):
            step()
        train_task()

    bare_sft()


def train(args: argparse.Namespace) -> None:
    import datasets
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    train = datasets.Dataset.from_dict({"text": read_texts(args.data / "train.jsonl")})
    eval_ = datasets.Dataset.from_dict({"text": read_texts(args.data / "eval.jsonl")})

    class StopAfter(TrainerCallback):
        def __init__(self, n: int) -> None:
            self.n, self.done = n, 0

        def on_step_end(self, a, state, control, **kw):
            self.done += 1
            if self.done >= self.n:
                control.should_training_stop = True
            return control

    config = SFTConfig(
        output_dir=args.out,
        max_steps=args.max_steps,
        num_train_epochs=2,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=2e-4,
        seed=42,
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        eval_strategy="steps",
        eval_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        load_best_model_at_end=False,
        max_length=128,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        **PRECISION_ARGS.get(args.precision, {}),
        **GRADIENT_CHECKPOINTING_ARGS[args.gradient_checkpointing],
    )
    print(f"precision: {'bf16' if config.bf16 else 'fp16' if config.fp16 else 'fp32'}", flush=True)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=eval_,
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM"),
        callbacks=[StopAfter(args.stop_after)] if args.stop_after else None,
    )
    trainer.train(resume_from_checkpoint=args.resume_from)


if __name__ == "__main__":
    main()
