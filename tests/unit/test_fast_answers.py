"""The shortcuts that let `ckptflow run` answer a completed run without torch, Alembic or the ORM agree with the real thing."""

from __future__ import annotations

import pytest

from ckptflow import preflight
from ckptflow.schema_revision import shipped_head


def test_shipped_head_read_from_the_files_is_alembics_head():
    from ckptflow.ledger.store import head_revision

    assert shipped_head() == head_revision() is not None


@pytest.mark.parametrize(
    ("scripts", "head"),
    [
        ({"1.py": 'revision: str = "0001"\ndown_revision = None\n', "2.py": 'revision = "0002"\ndown_revision = "0001"\n'}, "0002"),
        ({"1.py": 'revision = "0001"\ndown_revision = None\n', "2.py": 'revision = "0002"\ndown_revision = ("0001", "x")\n'}, None),
        ({"1.py": 'revision = "a"\ndown_revision = None\n', "2.py": 'revision = "b"\ndown_revision = None\n'}, None),
        ({"__init__.py": ""}, None),
    ],
    ids=["chain", "merge-unsure", "two-heads-unsure", "none"],
)
def test_shipped_head_is_none_when_the_files_dont_say_plainly(tmp_path, scripts, head):
    for name, text in scripts.items():
        (tmp_path / name).write_text(text)
    assert shipped_head(tmp_path) == head


def test_stored_values_read_with_sqlite3_are_the_orms():
    from ckptflow.ledger import RunStatus
    from ckptflow.ledger import store

    assert (preflight._COMPLETED, preflight._NO_HOLDER) == (RunStatus.COMPLETED.value, store._NO_HOLDER)


def test_tokenizer_identity_from_files_is_the_loaded_tokenizers(tmp_path):
    """Else every completed run would fall back to loading transformers (correct, but slow)."""
    from ckptflow.data import tokenizer_identity
    from ckptflow.modeling import load_tokenizer, resolve_model
    from ckptflow.tokenizer_files import identity_from_files

    resolved = resolve_model("builtin:tiny-gpt2", tmp_path)
    assert identity_from_files(resolved.path) == tokenizer_identity(load_tokenizer(resolved))
    assert identity_from_files(tmp_path) is None  # no tokenizer files: not a guess


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:////abs/dir/ledger.db", "sqlite:///rel/ledger.db", "sqlite+pysqlite:////abs/l.db", "sqlite://",
        "sqlite:///:memory:", "sqlite:///", "sqlite:///file:x?mode=memory&uri=true", "sqlite:////a%20b/l.db",
        "sqlite:////abs/l.db?timeout=5", "postgresql+psycopg://u:p@h/db",
    ],
)  # fmt: skip
def test_sqlite_file_without_sqlalchemy_agrees_with_its_parser(url):
    from sqlalchemy.engine import make_url

    from ckptflow.sqlite_url import plain_sqlite_url, sqlite_file

    u = make_url(url)
    db = u.database
    parsed = None if u.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:") or u.query.get("mode") == "memory" else db
    assert sqlite_file(url) == (None if parsed is None else __import__("pathlib").Path(parsed))
    if plain_sqlite_url(url):
        assert u.get_backend_name() == "sqlite" and not u.query
