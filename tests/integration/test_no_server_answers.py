"""Answers that need no flow never start Prefect, and those that need no model never import torch.

Each case runs the real CLI's `main()` in a fresh interpreter and reports which heavy modules
ended up in `sys.modules` (an eager import anywhere on the path fails the test), and whether
Prefect made its home (it does on import and when a server starts).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds the completed home once (trains a tiny run)

# Modules an answer must not import: Prefect (and its server), and the training stack.
PREFECT = ("prefect",)
TRAINING = ("torch", "transformers", "datasets", "peft", "trl")

# Runs `ckptflow.cli.main` with argv, then writes the exit code and the heavy modules imported to $REPORT.
_DRIVER = """
import json, os, sys
sys.argv = ["ckptflow", *json.loads(os.environ["ARGS"])]
from ckptflow.cli import main
try:
    main()
    code = 0
except SystemExit as exc:
    code = exc.code or 0
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(os.environ["WATCH"])))
with open(os.environ["REPORT"], "w") as fh:
    json.dump({"code": code, "imported": heavy}, fh)
"""


def _answer(args: list[str], *, cwd: Path, tmp: Path, env: dict[str, str] | None = None) -> tuple[dict, subprocess.CompletedProcess]:
    report, prefect_home = tmp / "report.json", tmp / "prefect-home"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTFLOW_", "PREFECT_API_URL"))}
    proc = subprocess.run(
        [sys.executable, "-c", _DRIVER],
        cwd=cwd,
        env={**base, "CKPTFLOW_HOME": os.environ["CKPTFLOW_HOME"], "PREFECT_HOME": str(prefect_home),
             "ARGS": json.dumps(args), "WATCH": json.dumps(PREFECT + TRAINING), "REPORT": str(report), **(env or {})},
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert report.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(report.read_text())
    result["prefect_home_made"] = prefect_home.exists()
    return result, proc


# (id, CLI args, extra env, exit code, modules that must not be imported, text stderr must contain)
CASES = [
    ("completed-run", ["run", "--run-name", "base"], {}, 0, PREFECT + TRAINING, "already completed"),
    ("completed-run-json", ["run", "--run-name", "base", "--json"], {}, 0, PREFECT + TRAINING, ""),
    ("bad-run-name", ["run", "--run-name", "bad..name"], {}, 2, PREFECT + TRAINING, "--run-name"),
    ("bad-setting", ["run", "--run-name", "base"], {"CKPTFLOW_TRAIN__LAUNCHER": "bogus"}, 2, PREFECT + TRAINING, "CKPTFLOW_TRAIN__LAUNCHER"),
    ("unknown-variable", ["run"], {"CKPTFLOW_TRAIN__SEDE": "1"}, 2, PREFECT + TRAINING, "CKPTFLOW_TRAIN__SEED"),
    # Changed settings: refused after loading the real tokenizer (the guess from files can't refuse), never Prefect.
    ("changed-settings", ["run", "--run-name", "base"], {"CKPTFLOW_TRAIN__LEARNING_RATE": "0.001"}, 2, PREFECT, "--new"),
    ("runs", ["runs"], {}, 0, PREFECT + TRAINING, ""),
    ("checkpoints", ["checkpoints", "base"], {}, 0, PREFECT + TRAINING, ""),
    ("verify", ["verify", "base"], {}, 0, PREFECT + TRAINING, ""),
    ("plan", ["plan"], {}, 0, PREFECT, ""),  # counting LoRA parameters builds the model: torch, but no Prefect
]


@pytest.mark.parametrize("case_id, args, env, code, forbidden, says", CASES, ids=[c[0] for c in CASES])
def test_answer_starts_no_prefect_and_imports_only_what_it_needs(
    completed_home, tmp_path, case_id, args, env, code, forbidden, says
):
    result, proc = _answer(args, cwd=tmp_path, tmp=tmp_path, env=env)
    assert result["code"] == code, proc.stderr[-2000:]
    assert not set(result["imported"]) & set(forbidden), f"{case_id} imported {result['imported']}"
    assert not result["prefect_home_made"], f"{case_id} made a Prefect home (imported or started Prefect)"
    assert "Traceback" not in proc.stderr
    assert says in proc.stderr


def test_the_driver_sees_an_eager_import(completed_home, tmp_path):
    """The check can fail: the same driver reports torch once something on the path imports it."""
    result, proc = _answer(["run", "--run-name", "base"], cwd=tmp_path, tmp=tmp_path, env={"PYTHONSTARTUP": ""})
    assert "torch" not in result["imported"], proc.stderr[-2000:]
    sitecustomize = tmp_path / "eager" / "sitecustomize.py"
    sitecustomize.parent.mkdir()
    sitecustomize.write_text("import torch  # an eager import somewhere on the path\n")
    path = os.pathsep.join([str(sitecustomize.parent), os.environ.get("PYTHONPATH", "")])
    result, proc = _answer(["run", "--run-name", "base"], cwd=tmp_path, tmp=tmp_path, env={"PYTHONPATH": path})
    assert "torch" in result["imported"], proc.stderr[-2000:]
