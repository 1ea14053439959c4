"""Masking and redaction of credentials (URLs, SDK variables) in text and log records."""

from __future__ import annotations

import logging

import pytest

from ckptflow.secrets import MASK, SecretRegistry, install_redaction, mask_url, redact, registry, url_secrets


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql+psycopg://user:pw-1234@db.example:5432/ck", "postgresql+psycopg://user:***@db.example:5432/ck"),
        ("postgresql+psycopg://user:p%40ss@host/db?sslmode=require", "postgresql+psycopg://user:***@host/db?sslmode=require"),
        ("postgresql://host/db?user=u&password=hunter22", "postgresql://host/db?user=u&password=***"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("sqlite:////abs/home/ledger.db", "sqlite:////abs/home/ledger.db"),
        ("sqlite:///rel/ledger.db", "sqlite:///rel/ledger.db"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("s3://AKIAXXXX:verysecret@bucket/prefix", "s3://AKIAXXXX:***@bucket/prefix"),
        (None, None),
        ("", ""),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked


def test_url_secrets_include_the_decoded_password():
    assert url_secrets("postgresql://u:p%40ss-word@h/db") == ["p%40ss-word", "p@ss-word"]


def test_registry_redacts_the_longest_secret_whole():
    reg = SecretRegistry()
    reg.add(["abcd", "abcdefgh", "x"])  # "x" is too short to search for
    assert reg.redact("abcdefgh abcd x") == f"{MASK} {MASK} x"


def test_registry_reads_sdk_variables_and_url_settings():
    reg = SecretRegistry()
    reg.add_environment({"AWS_SECRET_ACCESS_KEY": "s3cr3t-key", "CKPTFLOW_LEDGER_URL": "postgresql://u:pg-pass-9@h/db", "HOME": "/root"})
    assert reg.redact("s3cr3t-key pg-pass-9 /root") == f"{MASK} {MASK} /root"


def test_redact_masks_any_url_password_even_unregistered():
    assert redact("connect postgresql://u:unknown-pw@h/db failed") == f"connect postgresql://u:{MASK}@h/db failed"


def test_log_records_are_redacted_in_every_handler(caplog, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leaky-secret-42")
    logger = logging.getLogger("ckptflow.test_secrets")
    install_redaction()
    install_redaction()  # idempotent: one filter per handler
    assert sum(type(f).__name__ == "RedactingFilter" for f in caplog.handler.filters) == 1
    try:
        raise RuntimeError("boto said leaky-secret-42")
    except RuntimeError:
        logger.exception("upload failed with key %s", "leaky-secret-42")
    assert "leaky-secret-42" not in caplog.text
    assert MASK in caplog.text
    registry._values.discard("leaky-secret-42")


TEAM_URL = "postgresql+psycopg://ck:team-Pass-4411@db.example/ckptflow"


def test_the_ledger_url_is_a_secret_setting(home, monkeypatch):
    from ckptflow.settings import load_settings

    monkeypatch.setenv("CKPTFLOW_LEDGER_URL", TEAM_URL)
    settings = load_settings()
    assert settings.ledger == TEAM_URL  # usable
    assert settings.ledger_shown == "postgresql+psycopg://ck:***@db.example/ckptflow"  # shown masked
    assert "team-Pass-4411" not in repr(settings) + str(settings.to_json()) + str(settings.fingerprint_inputs())
    assert "ledger_url" not in settings.to_json()


def test_an_invalid_secret_setting_is_not_echoed(home, tmp_path):
    from ckptflow.errors import ConfigError
    from ckptflow.settings import load_settings

    (tmp_path / "c.toml").write_text('ledger_url = ["team-Pass-4411"]\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(tmp_path / "c.toml")
    assert "ledger_url" in str(refused.value) and "team-Pass-4411" not in str(refused.value)


def test_a_chunk_job_file_never_holds_the_ledger_url(home, monkeypatch):
    from ckptflow.chunks import ChunkJob
    from ckptflow.planning import Chunk
    from ckptflow.settings import load_settings

    monkeypatch.setenv("CKPTFLOW_LEDGER_URL", TEAM_URL)
    job = ChunkJob.for_chunk(load_settings(), "r", Chunk(0, 0, 2))
    written = job.to_json()
    assert "team-Pass-4411" not in written
    assert ChunkJob.from_json(written, **{"ledger_url": None}) == job  # the child reads it from its environment
    assert job.child_env() == {"CKPTFLOW_LEDGER_URL": TEAM_URL}
