"""Run names and the paths derived from names and settings.

One grammar for run names (`validate_run_name`), checked wherever a name enters, and one
function (`contained`) through which every derived path is built: it resolves the path
(symlinks and `..` included) and refuses anything that is not strictly inside its root.
Defence in depth: a name that slipped past validation still cannot reach outside the home.
"""

from __future__ import annotations

import re
from pathlib import Path

from ckptflow.errors import BadInputError

__all__ = [
    "BUILTIN_DIR",
    "CHECKPOINTS_DIR",
    "DATA_CACHE_DIR",
    "EXPORTS_DIR",
    "LEDGER_FILE",
    "PREFECT_RESULTS_DIR",
    "QUARANTINE_DIR",
    "RUNS_DIR",
    "RUN_NAME_MAX_LENGTH",
    "RUN_NAME_PATTERN",
    "RUN_NAME_RULE",
    "InvalidRunNameError",
    "PathOutsideRootError",
    "contained",
    "is_within",
    "validate_run_name",
]

# Directories ckptflow owns under CKPTFLOW_HOME.
RUNS_DIR = "runs"  # runs/<run>/
EXPORTS_DIR = "exports"  # exports/<run>/
CHECKPOINTS_DIR = "checkpoints"  # runs/<run>/checkpoints/checkpoint-<step>/
QUARANTINE_DIR = "quarantine"  # runs/<run>/quarantine/
DATA_CACHE_DIR = "data-cache"  # tokenized datasets by fingerprint
BUILTIN_DIR = "builtin"  # built-in models, built once
PREFECT_RESULTS_DIR = "prefect-results"  # Prefect's persisted task results
LEDGER_FILE = "ledger.db"  # the default SQLite ledger

# Longest run name, suffix from `--new` (`-2`, `-3`, ...) included: one path component,
# far below every filesystem's 255-byte limit even with `.pruning-`/`.tmp-<pid>` prefixes.
RUN_NAME_MAX_LENGTH = 100
# ASCII letters, digits, `.`, `_`, `-`; first a letter or digit; a `.` is never followed by
# another `.`. No lookaround, so the same pattern works in pydantic (Rust regex) and in the
# Prefect UI form (JavaScript).
RUN_NAME_PATTERN = r"^[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*\.?$"
RUN_NAME_RULE = (
    f"a run name is 1-{RUN_NAME_MAX_LENGTH} characters: ASCII letters, digits, '.', '_' and '-', "
    "starting with a letter or digit, without '..'"
)
_RUN_NAME_RE = re.compile(RUN_NAME_PATTERN)


class InvalidRunNameError(BadInputError):
    """A run name outside the grammar (exit 2)."""


class PathOutsideRootError(BadInputError):
    """A derived path that would leave its root (exit 2)."""


def validate_run_name(name: object, *, suffix: str = "", option: str = "--run-name") -> str:
    """`name` if it follows the grammar (also with `suffix` appended, as `--new` does); else InvalidRunNameError.

    The message states the grammar and shows the name with repr(), so a newline or a
    trailing space is visible.
    """
    if not isinstance(name, str):
        raise InvalidRunNameError(f"invalid run name {name!r}: {RUN_NAME_RULE}; change {option}")
    full = name + suffix
    if _RUN_NAME_RE.fullmatch(full) and len(full) <= RUN_NAME_MAX_LENGTH:
        return name
    if _RUN_NAME_RE.fullmatch(name) and len(name) <= RUN_NAME_MAX_LENGTH:
        raise InvalidRunNameError(
            f"invalid run name {name!r} ({len(name)} characters): with the suffix {suffix!r} a new run would be named "
            f"{len(full)} characters long; {RUN_NAME_RULE}; pass a shorter {option}"
        )
    what = f"{len(name)} characters" if len(name) > RUN_NAME_MAX_LENGTH else _first_problem(name)
    raise InvalidRunNameError(f"invalid run name {name!r} ({what}): {RUN_NAME_RULE}; change {option}")


def _first_problem(name: str) -> str:
    if not name:
        return "empty"
    if ".." in name:
        return "contains '..'"
    if not re.match(r"[A-Za-z0-9]", name[0], re.ASCII):
        return f"starts with {name[0]!r}"
    bad = next(c for c in name if not re.fullmatch(r"[A-Za-z0-9._-]", c, re.ASCII))
    return f"contains {bad!r}"


def is_within(path: Path, root: Path) -> bool:
    """Whether the resolved `path` is `root` or below it (both resolved: symlinks followed)."""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path == root or root in path.parents


def contained(root: Path, *parts: str) -> Path:
    """`root / parts`, after proving that it resolves strictly inside the resolved `root`.

    Returns the unresolved join (so paths look like the settings that made them). Raises
    PathOutsideRootError for an absolute part, `..`, a symlink leading out, or a path equal
    to the root itself.
    """
    root = Path(root)
    shown = "/".join(parts)
    try:
        path = root.joinpath(*parts)
        real_root, real_path = root.resolve(), path.resolve()
    except (ValueError, OSError) as exc:  # e.g. an embedded NUL byte
        raise PathOutsideRootError(f"refusing path {shown!r} under {root}: {exc}; use a plain name") from None
    if real_path == real_root or real_root not in real_path.parents:
        raise PathOutsideRootError(
            f"refusing path {shown!r}: it resolves to {real_path}, which is not inside {real_root}; "
            "use a plain name (a run name, or a CKPTFLOW_HOME without symlinks leading out of it)"
        )
    return path
