"""An export describes its own step and carries nothing local: no home, no ledger URL, no machine paths."""

from __future__ import annotations

import json

import pytest

from tests.badinput import ckptflow

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_export_of_step_2_describes_step_2_and_nothing_local(completed_home, tmp_path, merge):
    out = tmp_path / "shipped"
    args = ["export", "base", "--step", "2", "--out", str(out), "--json"] + ([] if merge else ["--no-merge"])
    proc = ckptflow(*args, cwd=tmp_path, env={"CKPTFLOW_HOME": str(completed_home)})
    assert proc.returncode == 0, proc.stderr
    provenance = json.loads((out / "ckptflow-provenance.json").read_text())
    card = (out / "README.md").read_text()
    assert provenance["step"] == 2 and "best_step" not in provenance["metrics"]
    assert "step 2 of 4" in card and "best_step" not in card
    assert provenance["training"]["train"]["learning_rate"] == 0.0002
    assert provenance["checkpoint"] == "checkpoint-2"
    for path in out.iterdir():
        if path.suffix in (".json", ".md", ".txt"):
            text = path.read_text()
            for local in (str(completed_home), str(tmp_path), "ledger_url", "sqlite:", '"home"'):
                assert local not in text, f"{local!r} in {path.name}"
