"""The world size under torchrun: part of the run fingerprint (only when > 1), and the global batch of every count."""

from __future__ import annotations

import pytest
from ckptflow.runs import total_steps
from ckptflow.settings import Settings, steps_per_epoch

# training_fingerprint() of these settings before the world size existed (main at 80099e9): must not move.
_RECORDED = {
    "defaults": ({}, "9e17859d72cb8f6262f47ec1af59604deea08b73437ff3a77341c5e1fdb6e96c"),
    "batch 4, 8 steps": ({"train": {"batch_size": 4, "max_steps": 8}}, "846bc30b3512080940c0003bd6db221d2fcb336243c4dc589ff6436a2e0d3bfb"),
}  # fmt: skip


@pytest.mark.parametrize(
    "train",
    [
        {},
        {"launcher": "subprocess", "nproc_per_node": 4},  # nproc_per_node means nothing without torchrun
        {"launcher": "torchrun", "nproc_per_node": 1},
        {"ddp_timeout_seconds": 60, "gradient_checkpointing": False},
    ],
)
@pytest.mark.parametrize("case", list(_RECORDED))
def test_single_process_runs_keep_their_recorded_fingerprint(case, train):
    overrides, recorded = _RECORDED[case]
    merged = {**overrides, "train": {"bf16": False, **overrides.get("train", {}), **train}}  # recorded in fp32
    assert Settings(**merged).training_fingerprint() == recorded


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ({"launcher": "torchrun", "nproc_per_node": 2}, {"launcher": "torchrun", "nproc_per_node": 2}, True),
        ({"launcher": "torchrun", "nproc_per_node": 2}, {"launcher": "torchrun", "nproc_per_node": 3}, False),
        ({"launcher": "torchrun", "nproc_per_node": 2}, {"launcher": "inprocess", "nproc_per_node": 2}, False),
        ({"gradient_checkpointing": True}, {}, False),
        ({"bf16": True}, {"bf16": False}, False),
    ],
)
def test_world_size_and_gradient_checkpointing_enter_the_fingerprint(a, b, same):
    fa, fb = Settings(train=a).training_fingerprint(), Settings(train=b).training_fingerprint()
    assert (fa == fb) is same


@pytest.mark.parametrize(
    ("rows", "batch", "accum", "world", "expected"),
    [
        (4, 2, 1, 1, 2),  # the tutorial: 4 texts, batch 2
        (4, 2, 1, 2, 1),  # 2 ranks: one global batch of 4
        (512, 4, 1, 2, 64),  # bench: global batch 8
        (5, 2, 1, 2, 2),  # 3 batches over 2 ranks: the last round is padded
        (10, 1, 2, 3, 2),  # 10 micro-batches, 4 per rank, 2 per optimizer step
    ],
)
def test_steps_per_epoch_counts_global_batches(rows, batch, accum, world, expected):
    assert steps_per_epoch(rows, batch, accum, world) == expected


@pytest.mark.parametrize(("launcher", "nproc", "expected"), [("inprocess", 2, 4), ("torchrun", 1, 4), ("torchrun", 2, 2)])
def test_total_steps_use_the_world_size_only_under_torchrun(launcher, nproc, expected):
    settings = Settings(train={"epochs": 2, "batch_size": 2, "launcher": launcher, "nproc_per_node": nproc})
    assert total_steps(settings, train_rows=4) == expected
