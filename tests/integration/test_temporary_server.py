"""`ckptflow run` boots Prefect's temporary server itself (flows/temporary_server.py), and only when it trains.

The real CLI in a fresh interpreter, with its own PREFECT_HOME: a run the model check refuses
(after the server's child was prewarmed) starts no server; a Prefect profile that names an API
URL is used instead of a temporary server, as Prefect itself would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts Prefect and trains a tiny run


def _ckptflow(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTFLOW_", "PREFECT_API_URL", "PREFECT_PROFILE"))}
    return subprocess.run(
        [sys.executable, "-m", "ckptflow.cli", *args],
        cwd=cwd, env={**base, "CKPTFLOW_HOME": os.environ["CKPTFLOW_HOME"], **env},
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_a_run_the_model_check_refuses_starts_no_server(home, tmp_path):
    prefect_home = tmp_path / "prefect-home"
    env = {"PREFECT_HOME": str(prefect_home), "CKPTFLOW_MODEL__LORA_TARGET_MODULES": '["c_atn"]'}
    proc = _ckptflow(["run"], tmp_path, env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "CKPTFLOW_MODEL__LORA_TARGET_MODULES" in proc.stderr and "Traceback" not in proc.stderr
    assert "temporary server" not in proc.stderr
    # The prewarmed child only imported Prefect (which makes an empty home): no database, no server.
    assert not prefect_home.exists() or not any(prefect_home.iterdir()), sorted(prefect_home.iterdir())
    assert not home.exists() or not (home / "runs").exists()


def test_an_api_url_from_a_prefect_profile_is_used_instead_of_a_temporary_server(home, tmp_path):
    from tests.drills import session_server

    server = session_server()
    prefect_home = tmp_path / "prefect-home"
    prefect_home.mkdir()
    (prefect_home / "profiles.toml").write_text(f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{server.api_url}"\n')
    proc = _ckptflow(["run", "--run-name", "profiled"], tmp_path, {"PREFECT_HOME": str(prefect_home), "CKPTFLOW_TRAIN__MAX_STEPS": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "temporary server" not in proc.stderr
    assert "run profiled completed" in proc.stderr
