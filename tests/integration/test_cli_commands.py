"""The read/maintenance commands against a real finished run: --json is one document on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import finish_without_prefect, settings_for, train_without_prefect

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished demo run shared by the module's tests (they only read it, or export elsewhere)."""
    home = tmp_path_factory.mktemp("cli") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKPTFLOW_HOME", str(home))
        settings = settings_for(home)
        name = train_without_prefect(settings, "done")
        finish_without_prefect(settings, name)
    return home, name


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CKPTFLOW_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "ckptflow.cli", *args], env=env, capture_output=True, text=True, timeout=300)


def test_json_commands_print_one_document(finished, tmp_path):
    home, name = finished
    runs = json.loads(_cli(home, "runs", "--json").stdout)
    assert [(r["name"], r["status"], r["last_step"], r["total_steps"]) for r in runs] == [(name, "completed", 4, 4)]
    assert runs[0]["best_step"] in (2, 4) and runs[0]["best_metric"] is not None

    rows = json.loads(_cli(home, "checkpoints", name, "--json").stdout)
    assert [r["step"] for r in rows] == [2, 4]
    assert sum(r["is_best"] for r in rows) == 1
    assert all(Path(r["path"]).is_dir() and r["bytes"] > 0 and r["state"] == "committed" for r in rows)

    verify = _cli(home, "verify", name, "--json")
    assert verify.returncode == 0 and json.loads(verify.stdout)["ok"] is True

    out = tmp_path / "adapter-2"
    exported = _cli(home, "export", name, "--step", "2", "--out", str(out), "--no-merge", "--json")
    assert exported.returncode == 0, exported.stderr
    doc = json.loads(exported.stdout)
    assert (doc["step"], doc["merged"]) == (2, False)
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("checkpoints", "nope"), 2, "no run named 'nope'"),
        (("export", "done", "--step", "3"), 2, "no committed checkpoint at step 3"),
        (("verify", "nope"), 2, "no run named 'nope'"),
        (("prune", "nope", "--dry-run"), 2, "no run named 'nope'"),
    ],
)
def test_bad_arguments_exit_2(finished, args, code, message):
    home, _ = finished
    proc = _cli(home, *args)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
