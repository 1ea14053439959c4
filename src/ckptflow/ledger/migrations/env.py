"""Alembic environment of the ledger.

`Ledger(url)` runs migrations programmatically and passes its own open connection in
`config.attributes["connection"]` (inside a write transaction, so two processes opening
a fresh ledger are serialized). Run by hand, the URL comes from `-x url=...`, else from
ckptflow's settings.
"""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, pool

from ckptflow.ledger.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: later migrations use batch mode there.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from ckptflow.settings import load_settings

    return load_settings().ledger


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        # Called by Ledger: the caller owns the connection and its transaction.
        _configure(connection)
        context.run_migrations()
        return
    if config.config_file_name is not None:
        fileConfig(config.config_file_name, disable_existing_loggers=False)
    from ckptflow.ledger.store import make_engine

    engine = make_engine(_url(), poolclass=pool.NullPool)
    with engine.begin() as conn:
        _configure(conn)
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
