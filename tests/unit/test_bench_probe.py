"""The benchmark timing probe fails loudly when a function it wraps is gone (a library upgrade)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "_probe"))
import _bench_probe as probe  # noqa: E402


class _Owner:
    def present(self):
        return 1


@pytest.fixture(autouse=True)
def _clean_state():
    probe.STATE.pop("missing", None)
    yield
    probe.STATE.pop("missing", None)


def test_a_present_target_is_wrapped_and_nothing_is_missing():
    probe._patch(_Owner, "present", lambda f: probe._span_wrapper(f, "x"))
    assert getattr(_Owner.present, "_bench_probe", False)
    assert "missing" not in probe.STATE


def test_a_missing_target_is_recorded():
    probe._patch(_Owner, "renamed_by_upgrade", lambda f: f)
    probe._patch_classmethod(_Owner, "from_pretrained", "x")
    assert probe.STATE["missing"] == ["_Owner.renamed_by_upgrade", "_Owner.from_pretrained"]


def test_every_current_target_exists():
    """Against the pinned libraries nothing the probe wraps may be missing (checked in a fresh interpreter,
    so this test session's classes stay unwrapped)."""
    import subprocess

    code = (
        "import importlib, json, sys; sys.path.insert(0, sys.argv[1]); import _bench_probe as p\n"
        "for name, patch in p.PATCHES.items(): patch(importlib.import_module(name))\n"
        "print(json.dumps(p.STATE.get('missing', [])))"
    )
    probe_dir = str(Path(__file__).resolve().parents[2] / "benchmarks" / "_probe")
    proc = subprocess.run([sys.executable, "-c", code, probe_dir], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_run_probed_refuses_a_probe_with_missing_targets(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from _common import ProbeTargetMissing, run_probed

    script = (
        "import json, os; d = os.environ['CKPTFLOW_BENCH_PROBE']; "
        "open(os.path.join(d, 'probe-1.json'), 'w').write(json.dumps({'missing': ['Trainer._save_checkpoint']}))"
    )
    with pytest.raises(ProbeTargetMissing, match="Trainer._save_checkpoint"):
        run_probed("t", [sys.executable, "-c", script], {"PATH": "/usr/bin:/bin"})
