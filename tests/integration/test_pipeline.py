"""The pipeline's library steps on the real tiny model, real Trainer, real SQLite ledger (no Prefect)."""

from __future__ import annotations

import math

import pytest
from ckptflow.ledger import CheckpointState, Ledger

from tests.helpers import (
    adapter_weights,
    checkpoint_dirs_on_disk,
    committed_steps,
    finish_without_prefect,
    max_abs_diff,
    settings_for,
    train_without_prefect,
)

pytestmark = pytest.mark.slow


def test_defaults_reproduce_the_tutorial(home):
    settings = settings_for(home)
    name = train_without_prefect(settings, "demo")
    assert committed_steps(settings, name) == [2, 4]
    assert checkpoint_dirs_on_disk(settings, name) == [2, 4]
    ledger = Ledger(settings.ledger)
    run = ledger.get_run(name)
    rows = ledger.checkpoints(run.id, states=[CheckpointState.COMMITTED])
    ledger.close()
    losses = {c.step: c.metrics["eval_loss"] for c in rows}
    assert all(math.isfinite(v) for v in losses.values())
    expected_best = min(losses, key=lambda s: (losses[s], s))

    result = finish_without_prefect(settings, name)
    assert result["export"]["step"] == expected_best
    assert result["evaluation"]["best_step"] == expected_best
    # The evaluation recomputes exactly the eval_loss recorded at save time.
    assert result["evaluation"]["best_eval_loss"] == pytest.approx(losses[expected_best], rel=1e-5)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_dir = settings.export_dir(name)
    model = AutoModelForCausalLM.from_pretrained(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    ids = tokenizer("Checkpoints", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(generated[0]), str)
    assert (export_dir / "README.md").read_text().count("data fingerprint") == 1
    assert (export_dir / "ckptflow-provenance.json").is_file()


def test_chunks_of_one_step_are_bit_identical_to_one_chunk(home):
    whole = settings_for(home, train={"chunk_steps": 4})
    split = settings_for(home, train={"chunk_steps": 1})
    a = train_without_prefect(whole, "whole")
    b = train_without_prefect(split, "split")
    assert committed_steps(whole, a)[-1] == committed_steps(split, b)[-1] == 4
    diff = max_abs_diff(
        adapter_weights(whole.checkpoints_dir(a) / "checkpoint-4"),
        adapter_weights(split.checkpoints_dir(b) / "checkpoint-4"),
    )
    assert diff == 0.0


@pytest.mark.parametrize(
    ("retention", "expected_rule"),
    [("best", "3 best by eval_loss + newest"), ("recent", "3 newest + best")],
)
def test_retention_over_ten_saves_keeps_what_the_policy_says(home, retention, expected_rule):
    settings = settings_for(
        home,
        train={"max_steps": 20, "chunk_steps": 10, "learning_rate": 5e-3},
        data={"train": "builtin:demo-large"},
        checkpoint={"save_steps": 2, "eval_steps": 2, "save_total_limit": 3, "retention": retention},
    )
    name = train_without_prefect(settings, f"retention-{retention}")
    ledger = Ledger(settings.ledger)
    run = ledger.get_run(name)
    rows = ledger.checkpoints(run.id)
    ledger.close()
    assert [c.step for c in rows] == list(range(2, 21, 2))  # 10 saves recorded
    losses = {c.step: c.metrics["eval_loss"] for c in rows}
    ranked = sorted(losses, key=lambda s: (losses[s], s))
    best, newest = ranked[0], 20
    if retention == "best":
        expected = set(ranked[:3]) | {newest}
    else:
        expected = {16, 18, 20} | {best}
    kept = {c.step for c in rows if c.state == CheckpointState.COMMITTED}
    assert kept == expected, expected_rule
    assert all(c.reason for c in rows if c.state == CheckpointState.PRUNED)
    assert set(checkpoint_dirs_on_disk(settings, name)) == kept


def test_a_local_model_directory_trains_like_the_builtin(home, tmp_path):
    import shutil

    from ckptflow.builtin import materialize_tiny_gpt2

    local = tmp_path / "models" / "my-gpt2"
    shutil.copytree(materialize_tiny_gpt2(home), local)
    builtin = settings_for(home)
    by_path = settings_for(home, model={"name_or_path": str(local)})
    a = train_without_prefect(builtin, "builtin")
    b = train_without_prefect(by_path, "by-path")
    diff = max_abs_diff(
        adapter_weights(builtin.checkpoints_dir(a) / "checkpoint-4"),
        adapter_weights(by_path.checkpoints_dir(b) / "checkpoint-4"),
    )
    assert diff == 0.0
