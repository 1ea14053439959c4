"""Keep credentials out of everything ckptflow writes or prints.

Settings that can hold a credential (the ledger URL) are shown only masked
(`postgresql+psycopg://user:***@host/db`), and every secret this process knows — the
ledger URL's password and the standard cloud-SDK variables (AWS keys, Prefect's API key
and auth string, …) — is replaced by `***` in log records and error messages, whichever
library produced them (SQLAlchemy, fsspec, botocore, Prefect).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, unquote, urlsplit

MASK = "***"
# Environment variables whose values are credentials of the SDKs ckptflow talks through.
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS_JSON",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_CONNECTION_STRING",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_SERVER_API_AUTH_STRING",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "WANDB_API_KEY",
    "PGPASSWORD",
)
# Query parameters of a URL that carry credentials (`?password=…`, `?aws_secret_access_key=…`).
_SECRET_QUERY_KEY = re.compile(r"pass|secret|token|key|credential|auth", re.IGNORECASE)
# Shorter values are not searched for in text: replacing "1" everywhere would mangle messages.
_MIN_SECRET_LENGTH = 4


def mask_url(url: str | None) -> str | None:
    """`scheme://user:password@host/db?password=x` → `scheme://user:***@host/db?password=***`; other text unchanged."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    masked = url
    if parts.password is not None:
        userinfo = parts.netloc.rpartition("@")[0]
        user = userinfo.partition(":")[0]
        masked = masked.replace(f"{userinfo}@", f"{user}:{MASK}@", 1)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_QUERY_KEY.search(key) and value:
            masked = re.sub(rf"([?&]{re.escape(key)}=)[^&#]*", rf"\g<1>{MASK}", masked)
    return masked


def url_secrets(url: str | None) -> list[str]:
    """The credential parts of a URL: its password and secret-looking query values."""
    if not url:
        return []
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found = []
    if parts.password:
        found += [parts.password, unquote(parts.password)]
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if _SECRET_QUERY_KEY.search(key) and value:
            found.append(value)
    return found


class SecretRegistry:
    """The secrets this process must never write or print; redacts them from text."""

    def __init__(self) -> None:
        self._values: set[str] = set()

    def add(self, values: Iterable[str | None]) -> None:
        for value in values:
            if value and len(value) >= _MIN_SECRET_LENGTH:
                self._values.add(value)

    def add_url(self, url: str | None) -> None:
        self.add(url_secrets(url))

    def add_environment(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.add(env.get(name) for name in SECRET_ENV_VARS)
        for name, value in env.items():  # a URL-valued setting may carry a password (CKPTFLOW_LEDGER_URL)
            if name.startswith("CKPTFLOW_") and "://" in value:
                self.add_url(value)

    def redact(self, text: str) -> str:
        # Longest first, so a secret containing another is replaced whole.
        for value in sorted(self._values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, MASK)
        return text

    def __len__(self) -> int:
        return len(self._values)


registry = SecretRegistry()


class RedactingFilter(logging.Filter):
    """Rewrites a record's message (and exception text) with every known secret masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not len(registry):
            return True
        message = record.getMessage()
        redacted = registry.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = registry.redact(text)
            record.exc_info = None
        return True


_FILTER = RedactingFilter()


def install_redaction(extra_urls: Iterable[str | None] = ()) -> None:
    """Register this process's secrets and mask them in every handler of every logger that exists now.

    Filters sit on handlers (not loggers) so records propagated from any library are masked;
    called again after Prefect has configured its handlers.
    """
    registry.add_environment()
    for url in extra_urls:
        registry.add_url(url)
    loggers = [logging.getLogger(), *(l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)


def redact(text: str) -> str:
    """`text` with every registered secret (and every URL password in it) masked."""
    text = registry.redact(text)
    return re.sub(r"(\w[\w+.-]*://[^:/@\s]*:)([^@\s]+)(@)", rf"\1{MASK}\3", text)


__all__ = ["MASK", "SECRET_ENV_VARS", "RedactingFilter", "install_redaction", "mask_url", "redact", "registry", "url_secrets"]
