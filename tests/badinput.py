"""Harness for table-driven bad-input tests: run the real CLI, prove it refused and changed nothing.

A case is refused when the CLI exits with the expected code (2: input the user must fix),
prints no Python traceback, names what to change, and leaves the ledger (an SQL dump) and
the file trees of the home and the working directory exactly as they were.

    snap = snapshot(home, cwd)
    proc = ckptflow("run", "--run-name", "..", cwd=cwd, env={"CKPTFLOW_HOME": str(home)})
    assert_refused(proc, mentions=["run name"])
    assert snapshot(home, cwd) == snap
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The ledger file of a default home.
LEDGER_FILE = "ledger.db"
# SQLite's side files: a reader may create or remove them without changing the database.
_SQLITE_SIDE_FILES = ("ledger.db-wal", "ledger.db-shm", "ledger.db-journal")


@dataclass(frozen=True)
class Case:
    """One bad input: CLI arguments, extra env, files to create in the cwd, and what the message must name."""

    id: str
    args: tuple[str, ...]
    mentions: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str | bytes] = field(default_factory=dict)
    code: int = 2


def ckptflow(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real CLI in a fresh interpreter, with this process's environment minus stray CKPTFLOW_* plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("CKPTFLOW_")}
    return subprocess.run(
        [sys.executable, "-m", "ckptflow.cli", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def write_files(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def ledger_dump(db: Path) -> list[str] | None:
    """The SQL dump of a SQLite ledger (None when there is none), read without writing to it."""
    if not db.is_file():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.Error:
        return [f"<unreadable: {db.read_bytes()[:64]!r}>"]
    try:
        return list(con.iterdump())
    except sqlite3.Error as exc:
        return [f"<not sqlite: {exc}>"]
    finally:
        con.close()


def tree(root: Path) -> dict[str, Any]:
    """Every entry under `root` (relative path → kind, size, sha256 of content, mode), without SQLite side files."""
    if not root.exists() and not root.is_symlink():
        return {}
    if root.is_file():
        return {".": _entry(root)}
    entries: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if name in _SQLITE_SIDE_FILES or "__pycache__" in rel:
                continue
            entries[rel] = _entry(path)
    return entries


def _entry(path: Path) -> tuple:
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_dir():
        return ("dir", oct(path.stat().st_mode & 0o777))
    data = path.read_bytes()
    return ("file", len(data), hashlib.sha256(data).hexdigest(), oct(path.stat().st_mode & 0o777))


def snapshot(home: Path, cwd: Path, *extra: Path) -> dict[str, Any]:
    """Ledger dump plus the trees of the home, the working directory and any `extra` paths."""
    snap: dict[str, Any] = {"ledger": ledger_dump(home / LEDGER_FILE), "home": tree(home), "cwd": tree(cwd)}
    for i, path in enumerate(extra):
        snap[f"extra{i}:{path}"] = tree(path)
    return snap


def assert_refused(proc: subprocess.CompletedProcess, *, mentions: tuple[str, ...] | list[str] = (), code: int = 2) -> None:
    """Exit `code`, no traceback anywhere, and stderr names each of `mentions` (case-insensitive)."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in output, output
    flat = " ".join(proc.stderr.split()).lower()  # rich may wrap long messages
    for text in mentions:
        assert " ".join(text.split()).lower() in flat, f"{text!r} not in stderr:\n{proc.stderr}"


def assert_unchanged(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Equal snapshots, with a readable diff of what changed."""
    if before == after:
        return
    lines = []
    for key in sorted(set(before) | set(after)):
        b, a = before.get(key), after.get(key)
        if b == a:
            continue
        if isinstance(b, dict) and isinstance(a, dict):
            for rel in sorted(set(b) | set(a)):
                if b.get(rel) != a.get(rel):
                    lines.append(f"{key}/{rel}: {b.get(rel)} -> {a.get(rel)}")
        else:
            lines.append(f"{key}: changed ({len(b or [])} -> {len(a or [])} lines)")
    raise AssertionError("bad input changed state:\n" + "\n".join(lines[:40]))


def run_case(case: Case, *, home: Path, cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Create the case's files, snapshot, run it, and assert it was refused without changing anything."""
    write_files(cwd, case.files)
    before = snapshot(home, cwd)
    env = {"CKPTFLOW_HOME": str(home), **(extra_env or {}), **case.env}
    proc = ckptflow(*case.args, cwd=cwd, env=env)
    assert_refused(proc, mentions=case.mentions, code=case.code)
    assert_unchanged(before, snapshot(home, cwd))
    return proc
