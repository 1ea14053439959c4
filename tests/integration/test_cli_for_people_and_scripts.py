"""The CLI for scripts and people: `run --json`, full values in pipes, `retrain` from the command line."""

from __future__ import annotations

import json

import pytest

from tests.badinput import ckptflow

pytestmark = pytest.mark.slow

LONG_NAME = "a-rather-long-run-name-that-a-table-at-eighty-columns-would-truncate-" + "x" * 20


def _server_env() -> dict[str, str]:
    """The session's running Prefect server (tests/drills.py): no temporary server per command (what it
    does is tested in test_fast_exit and test_temporary_server); output and results are the same."""
    from tests.drills import session_server

    return {"PREFECT_API_URL": session_server().api_url}


def test_run_json_prints_the_result_on_stdout_and_says_what_it_does_first(home, tmp_path):
    proc = ckptflow("run", "--run-name", LONG_NAME, "--json", cwd=tmp_path, env={"CKPTFLOW_HOME": str(home), **_server_env()})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.splitlines()[0].startswith("ckptflow run: checking settings")
    result = json.loads(proc.stdout)  # nothing but the document on stdout
    assert result["run"] == LONG_NAME and result["status"] == "completed"
    assert result["export"]["step"] == 4 and result["evaluation"]["best_step"] == 4
    assert [c["end_step"] for c in result["chunks"]] == [2, 4]
    assert "step 1/4 (25%) · loss" in proc.stderr  # readable log lines, not a dict
    assert "{'loss'" not in proc.stderr

    # Listings in a pipe: tab-separated, full values, nothing truncated.
    runs = ckptflow("runs", cwd=tmp_path, env={"CKPTFLOW_HOME": str(home)})
    header, row = runs.stdout.splitlines()
    assert header.split("\t")[0] == "name" and row.split("\t")[0] == LONG_NAME
    listing = ckptflow("checkpoints", LONG_NAME, cwd=tmp_path, env={"CKPTFLOW_HOME": str(home)})
    paths = [line.split("\t")[-1] for line in listing.stdout.splitlines()[1:]]
    assert paths == [str(home / "runs" / LONG_NAME / "checkpoints" / f"checkpoint-{s}") for s in (2, 4)]

    again = ckptflow("run", "--run-name", LONG_NAME, "--json", cwd=tmp_path, env={"CKPTFLOW_HOME": str(home)})
    assert again.returncode == 0 and json.loads(again.stdout)["already_completed"] is True


def test_retrain_runs_the_retrain_flow_locally(home, tmp_path):
    env = {"CKPTFLOW_HOME": str(home), **_server_env()}
    first = ckptflow("retrain", "--json", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    decision = json.loads(first.stdout)
    assert decision["action"] == "promote" and (home / "exports" / "champion.json").is_file()
    second = ckptflow("retrain", cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "retrain: skip — skipped: no new data" in second.stderr
