"""Relative paths in a `--config` TOML file resolve against the file's directory; values from
the environment, `.env` and overrides keep resolving against the working directory."""

from __future__ import annotations

from pathlib import Path

import pytest
from ckptflow.settings import load_settings


def _get(settings, key: str):
    value = settings
    for part in key.split("."):
        value = getattr(value, part)
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("data.train", "data/train.jsonl", "{cfg}/data/train.jsonl"),
        ("data.train", "./train.jsonl", "{cfg}/train.jsonl"),
        ("data.train", "../shared/train.jsonl", "{cfg.parent}/shared/train.jsonl"),
        ("data.train", "/srv/data/train.jsonl", "/srv/data/train.jsonl"),
        ("data.train", "builtin:demo", "builtin:demo"),
        ("data.eval", "data/eval.csv", "{cfg}/data/eval.csv"),
        ("data.eval", "", ""),
        ("home", "runs-home", "{cfg}/runs-home"),
        ("home", "/var/ckptflow", "/var/ckptflow"),
        ("ledger_url", "sqlite:///ledger.db", "sqlite:///{cfg}/ledger.db"),
        ("ledger_url", "sqlite+pysqlite:///db/l.db?timeout=5", "sqlite+pysqlite:///{cfg}/db/l.db?timeout=5"),
        ("ledger_url", "sqlite:////abs/l.db", "sqlite:////abs/l.db"),
        ("ledger_url", "sqlite:///:memory:", "sqlite:///:memory:"),
        ("ledger_url", "postgresql+psycopg://u@db/ckpt", "postgresql+psycopg://u@db/ckpt"),
        ("model.name_or_path", "./models/base", "{cfg}/models/base"),
        ("model.name_or_path", "../base", "{cfg.parent}/base"),
        ("model.name_or_path", "local-model", "{cfg}/local-model"),  # a directory next to the file
        ("model.name_or_path", "gpt2", "gpt2"),  # a hub id
        ("model.name_or_path", "org/name", "org/name"),  # a hub id, no such directory
        ("model.name_or_path", "builtin:tiny-gpt2", "builtin:tiny-gpt2"),
    ],
)
def test_toml_paths_resolve_against_the_file(home, tmp_path, monkeypatch, key, value, expected):
    monkeypatch.delenv("CKPTFLOW_HOME")  # the environment would win over the file
    cfg = tmp_path / "configs"
    (cfg / "local-model").mkdir(parents=True)
    (tmp_path / "local-model").mkdir()  # the same name in the cwd must not win
    group, _, name = key.rpartition(".")
    header = f"[{group}]\n" if group else ""
    (cfg / "run.toml").write_text(f'{header}{name} = "{value}"\n')
    settings = load_settings(cfg / "run.toml")
    assert str(_get(settings, key)) == expected.format(cfg=cfg)


def test_a_relative_config_path_resolves_from_its_own_directory(home, tmp_path, monkeypatch):
    cfg = tmp_path / "a" / "b"
    cfg.mkdir(parents=True)
    (cfg / "run.toml").write_text('[data]\ntrain = "train.jsonl"\n')
    monkeypatch.chdir(tmp_path / "a")
    assert load_settings("b/run.toml").data.train == str(cfg / "train.jsonl")


@pytest.mark.parametrize("source", ["env", "dotenv", "override"])
def test_values_from_other_sources_stay_relative_to_the_working_directory(home, tmp_path, monkeypatch, source):
    cfg = tmp_path / "configs"
    cfg.mkdir()
    (cfg / "run.toml").write_text('[data]\ntrain = "in-config.jsonl"\n')
    overrides = {}
    if source == "env":
        monkeypatch.setenv("CKPTFLOW_DATA__TRAIN", "mine.jsonl")
    elif source == "dotenv":
        (tmp_path / ".env").write_text("CKPTFLOW_DATA__TRAIN=mine.jsonl\n")
    else:
        overrides = {"data": {"train": "mine.jsonl"}}
    assert load_settings(cfg / "run.toml", **overrides).data.train == "mine.jsonl"


def test_the_other_groups_of_the_file_are_untouched(home, tmp_path):
    (tmp_path / "c.toml").write_text('[data]\ntrain = "t.jsonl"\ntext_field = "body"\n[train]\nseed = 7\n')
    settings = load_settings(tmp_path / "c.toml")
    assert (settings.data.text_field, settings.train.seed) == ("body", 7)
    assert Path(settings.data.train).is_absolute()
