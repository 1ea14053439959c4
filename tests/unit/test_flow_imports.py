"""Importing the flows (what `prefect deploy`, `ckptflow serve` and a worker's flow run do first) does not
import the training stack: that waits until a chunk trains or data is tokenized."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAINING = ("torch", "transformers", "datasets", "peft", "trl", "accelerate")


def test_importing_the_flows_and_serve_leaves_the_training_stack_unimported():
    code = (
        "import json, sys\n"
        "import flows.finetune, flows.retrain, deployments.serve\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(TRAINING)!r}))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
