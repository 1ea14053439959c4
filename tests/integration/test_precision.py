"""Precision like TRL on the real tiny model: the default (`auto`) trains in bf16 on this CPU (avx512_bf16),
and chunked and resumed bf16 runs are bit-identical to one uninterrupted chunk (max |Δ| == 0.0).

A run recorded in fp32 is not resumed under a default that now resolves to bf16: the CLI refuses
(exit 2) before Prefect, naming the pin.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from ckptflow.ledger import Ledger
from ckptflow.precision import this_machine
from ckptflow.reports import summary_markdown
from ckptflow.training import InjectedFault

from tests.badinput import Case, ckptflow, run_case
from tests.helpers import adapter_weights, committed_steps, max_abs_diff, settings_for, train_without_prefect

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not this_machine().bf16, reason="needs a CPU or GPU that runs bf16 natively (auto = bf16)"),
]

LAST = 4  # the seed demo: 4 steps, saves at 2 and 4


@dataclass(frozen=True)
class Reference:
    bf16: Path  # home of the default run (auto → bf16), one chunk
    fp32: Path  # home of the same run pinned to fp32, one chunk


def _final(home: Path, run: str) -> dict:
    return adapter_weights(home / "runs" / run / "checkpoints" / f"checkpoint-{LAST}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("precision")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        for key in [k for k in os.environ if k.startswith("CKPTFLOW_")]:
            mp.delenv(key)
        train_without_prefect(settings_for(root / "bf16", train={"chunk_steps": LAST}), "bf16")
        train_without_prefect(settings_for(root / "fp32", train={"chunk_steps": LAST, "bf16": False}), "fp32")
    return Reference(root / "bf16", root / "fp32")


def test_the_default_trains_in_bf16_and_records_it(reference):
    with Ledger(f"sqlite:///{reference.bf16 / 'ledger.db'}", home=reference.bf16) as ledger:
        recorded = ledger.get_run("bf16").config["settings"]["train"]
        summary = summary_markdown(ledger, "bf16", embed=False)
    assert (recorded["bf16"], recorded["fp16"]) == (True, False)  # resolved, never `auto`
    assert "precision: bf16" in summary
    # bf16 autocast really ran: the weights differ from the fp32 run's (same seed, same data).
    assert max_abs_diff(_final(reference.bf16, "bf16"), _final(reference.fp32, "fp32")) > 0.0


def test_the_seed_demo_still_commits_checkpoints_2_and_4(reference):
    assert committed_steps(settings_for(reference.bf16), "bf16") == [2, 4]


def test_chunks_of_one_step_in_bf16_are_bit_identical_to_one_chunk(home, reference):
    split = settings_for(home, train={"chunk_steps": 1})
    assert split.train.precision == "bf16"
    train_without_prefect(split, "bf16")
    assert max_abs_diff(_final(split.home, "bf16"), _final(reference.bf16, "bf16")) == 0.0


def test_a_bf16_run_interrupted_then_resumed_is_bit_identical(home, reference):
    interrupted = settings_for(home, train={"chunk_steps": 2}, fault={"at_step": 3, "mode": "raise"})
    with pytest.raises(InjectedFault):
        train_without_prefect(interrupted, "bf16")
    assert committed_steps(interrupted, "bf16") == [2]
    resumed = settings_for(home, train={"chunk_steps": 2})
    train_without_prefect(resumed, "bf16")  # chunk 0 is committed; chunk 1 resumes from checkpoint-2
    assert max_abs_diff(_final(home, "bf16"), _final(reference.bf16, "bf16")) == 0.0


def test_resuming_an_fp32_run_under_auto_is_refused_with_the_pin(reference, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(reference.fp32, home)
    case = Case(
        "fp32-run-under-auto",
        ("run", "--run-name", "fp32"),
        mentions=("precision: fp32 -> bf16", "CKPTFLOW_TRAIN__BF16=false", "--new"),
    )
    proc = run_case(case, home=home, cwd=tmp_path)
    assert "train.bf16" not in proc.stderr  # one line for the precision, not a raw key per switch


def test_plan_shows_the_precision(home):
    proc = ckptflow("plan", "--json", cwd=home.parent, env={"CKPTFLOW_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["precision"] == "bf16"


@pytest.mark.parametrize(
    "case",
    [
        Case("both-on", ("run",), ("CKPTFLOW_TRAIN__BF16", "CKPTFLOW_TRAIN__FP16"),
             env={"CKPTFLOW_TRAIN__BF16": "true", "CKPTFLOW_TRAIN__FP16": "true"}),
        Case("fp16-on-cpu", ("run",), ("fp16", "CKPTFLOW_TRAIN__FP16=false"), env={"CKPTFLOW_TRAIN__FP16": "true"}),
        Case("bad-switch", ("plan",), ("CKPTFLOW_TRAIN__BF16", "true, false or 'auto'"), env={"CKPTFLOW_TRAIN__BF16": "fast"}),
    ],
    ids=lambda c: c.id,
)  # fmt: skip
def test_impossible_precisions_are_refused_before_anything_runs(home, tmp_path, case):
    if case.id == "fp16-on-cpu" and this_machine().cuda:
        pytest.skip("fp16 is legal on a CUDA GPU")
    run_case(case, home=home, cwd=tmp_path)
