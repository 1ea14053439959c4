"""Readable training log lines: step/total, rounded loss, lr, grad norm, throughput and ETA."""

from __future__ import annotations

import itertools

import pytest

from ckptflow.logline import StepRate, format_log_line

TRAIN_LOG = {"loss": 6.198313, "grad_norm": 0.209956, "learning_rate": 0.0001, "entropy": 6.89, "epoch": 1.5}


@pytest.mark.parametrize(
    ("step", "total", "logs", "rate", "line"),
    [
        (3, 4, TRAIN_LOG, None, "step 3/4 (75%) · loss 6.198 · lr 1.00e-04 · grad 0.21"),
        (3, 4, TRAIN_LOG, 2.0, "step 3/4 (75%) · loss 6.198 · lr 1.00e-04 · grad 0.21 · 2 steps/s · ETA 0:00:00"),
        (100, 4000, {"loss": 2.5}, 1.25, "step 100/4000 (2%) · loss 2.5 · 1.25 steps/s · ETA 0:52:00"),
        (
            4,
            4,
            {"eval_loss": 6.891879, "eval_runtime": 0.65, "eval_samples_per_second": 3.1},
            None,
            "step 4/4 (100%) · eval loss 6.8919 · ppl 984.2 · eval 0.65 s",
        ),
        (4, 4, {"eval_loss": float("nan")}, None, "step 4/4 (100%) · eval loss nan"),
        (4, 4, {"train_runtime": 3.2, "train_loss": 5.9}, None, None),
    ],
    ids=["train", "train-rate", "eta", "eval", "eval-nan", "summary-hidden"],
)
def test_format_log_line(step, total, logs, rate, line):
    assert format_log_line(step, total, logs, rate) == line


def test_no_raw_dict_and_no_long_floats():
    line = format_log_line(3, 4, TRAIN_LOG, 1.0)
    assert "{" not in line and "6.198313" not in line


def test_step_rate_counts_this_process_only():
    clock = itertools.count(start=100.0, step=0.5).__next__  # every observe is 0.5 s after the last
    rate = StepRate(clock=clock)
    assert rate.observe(50) is None  # a resumed chunk's first step: no rate yet
    assert rate.observe(51) == pytest.approx(2.0)
    assert rate.observe(53) == pytest.approx(3 / 1.0)


@pytest.mark.parametrize(
    ("text", "step_line"),
    [
        (format_log_line(3, 4, TRAIN_LOG, 2.0), True),
        (format_log_line(3, 4, {}, None), True),  # a step with nothing to show is still the per-step stream
        (format_log_line(4, 4, {"eval_loss": 6.9, "eval_runtime": 0.6}, None), False),
        ("2026-11-29 15:18:02,611 rank0 ckptflow.chunks: " + format_log_line(3, 4, TRAIN_LOG, None), True),  # relayed
        ("committed checkpoint-10 (139987 bytes, eval_loss=6.92844)", False),
        ("pruned checkpoint-20: not among the 2 best by eval_loss", False),
    ],
    ids=["train", "bare-step", "eval", "relayed-from-child", "commit", "prune"],
)
def test_is_step_line(text, step_line):
    from ckptflow.logline import is_step_line

    assert is_step_line(text) is step_line


@pytest.mark.parametrize(("main_process", "lines"), [(True, 1), (False, 0)], ids=["rank0", "other-rank"])
def test_log_callback_logs_once_per_logging_step_on_the_main_process_only(main_process, lines, caplog):
    """HF calls on_log on every DDP rank: one line per logging step, not one per rank; step lines are marked."""
    import logging

    from transformers import TrainerControl, TrainerState, TrainingArguments

    from ckptflow.logline import STEP_LINE
    from ckptflow.training import LogCallback

    logger = logging.getLogger("ckptflow.test-logcallback")
    state = TrainerState(global_step=3, max_steps=4, is_world_process_zero=main_process)
    with caplog.at_level(logging.INFO, logger=logger.name):
        LogCallback(logger).on_log(TrainingArguments(output_dir="unused", report_to="none"), state, TrainerControl(), logs=TRAIN_LOG)
    records = [r for r in caplog.records if r.name == logger.name]
    assert len(records) == lines
    assert all(getattr(r, STEP_LINE) is True and r.getMessage().startswith("step 3/4") for r in records)
