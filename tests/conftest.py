"""Shared test setup: offline, quiet, no analytics; every test gets its own CKPTFLOW_HOME."""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import pytest


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh CKPTFLOW_HOME, and a cwd without a stray .env."""
    h = tmp_path / "home"
    monkeypatch.setenv("CKPTFLOW_HOME", str(h))
    monkeypatch.chdir(tmp_path)
    for key in list(os.environ):
        if key.startswith("CKPTFLOW_") and key != "CKPTFLOW_HOME":
            monkeypatch.delenv(key)
    return h
