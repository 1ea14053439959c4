"""The ledger schema's newest shipped revision, read from the migration files without importing Alembic.

Alembic (~0.1 s to import, with Mako) is needed only when a ledger is not at this revision: to
upgrade it or to refuse it. Opening a ledger that is at it, and the answers that must stay about
as fast as `ckptflow --help`, compare against this instead. Stdlib only: importing it imports
neither SQLAlchemy nor the ledger package.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

MIGRATIONS = Path(__file__).parent / "ledger" / "migrations" / "versions"
_REVISION_LINE = re.compile(r"^(revision|down_revision)\b[^=\n]*=\s*(.+?)\s*$", re.MULTILINE)


def shipped_head(migrations: Path | None = None) -> str | None:
    """The newest migration in `migrations` (default: this package's); None when the files don't say plainly.

    None is "ask Alembic", never "no schema": a merge (a tuple of parents), two heads, or anything
    unusual in a revision line.
    """
    if migrations is None:
        return _package_head()
    revisions, parents = set(), set()
    for script in migrations.glob("*.py"):
        found = dict(_REVISION_LINE.findall(script.read_text()))
        if "revision" not in found:
            continue
        values = {key: value.strip() for key, value in found.items()}
        if not all(re.fullmatch(r"\"\w+\"|'\w+'|None", v) for v in values.values()):
            return None
        revisions.add(values["revision"].strip("\"'"))
        if values.get("down_revision", "None") != "None":
            parents.add(values["down_revision"].strip("\"'"))
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


@functools.cache  # the package's migration files: read once per process
def _package_head() -> str | None:
    return shipped_head(MIGRATIONS)
