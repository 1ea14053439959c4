"""The raw settings sources, read by name: a TOML file (with line numbers), `.env` (with line
numbers) and the environment.

pydantic-settings ignores names it does not know, so a typo (`[trian]`, a top-level
`save_steps`, `CKPTFLOW_CHEKPOINT__SAVE_STEPS`, `CKPTFLOW_CHECKPOINT_SAVE_STEPS`) would
silently fall back to a default. Here every name a source sets is checked against the
settings schema, and an unknown one is reported with where it was set and the nearest
valid name. Relative paths in a TOML file are made absolute against the file's directory.
"""

from __future__ import annotations

import difflib
import io
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckptflow.errors import ConfigError

__all__ = [
    "NON_SETTING_VARIABLES",
    "Schema",
    "TomlConfig",
    "Variable",
    "dotenv_variables",
    "env_variables",
    "override_names",
    "read_toml",
    "resolve_toml_paths",
    "unknown_toml_names",
    "unknown_variable_names",
]

# Top-level name → the field names of its group, or None for a plain setting (`home`).
Schema = Mapping[str, frozenset[str] | None]

# CKPTFLOW_* variables ckptflow reads that are not settings. Every other CKPTFLOW_* name
# must be a setting; add a new non-setting variable here or it is refused as a typo.
NON_SETTING_VARIABLES = frozenset(
    {
        "CKPTFLOW_LAUNCHER_PID",  # worker.py: the launcher's pid, watched by a chunk's child process
        "CKPTFLOW_REPO",  # deployments/prefect.yaml: the checkout a deployment runs from
        "CKPTFLOW_SAVE_SCREENSHOTS",  # tests/e2e/test_ui_browser.py: keep the browser test's screenshots
    }
)
# Prefixes of non-setting variable families: benchmarks/ (results dir, source tree, probe).
NON_SETTING_PREFIXES = ("CKPTFLOW_BENCH_",)

# TOML keys whose relative values are paths, resolved against the file's directory.
_PATH_KEYS = (("data", "train"), ("data", "eval"), ("home",))
_BUILTIN_PREFIX = "builtin:"
_TABLE = re.compile(r"^\s*\[\[?\s*(?P<name>[^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*(?P<key>[A-Za-z0-9_\-]+(\s*\.\s*[A-Za-z0-9_\-\"']+)*|\"[^\"]*\"|'[^']*')\s*=")


@dataclass(frozen=True)
class TomlConfig:
    """A parsed TOML settings file and the line where each key path is set."""

    path: Path  # absolute
    data: dict[str, Any]
    lines: dict[tuple[str, ...], int] = field(default_factory=dict)

    def where(self, *key: str) -> str:
        """`/abs/c.toml:3` (the line of `key`, else of its table), or the file alone."""
        for n in range(len(key), 0, -1):
            line = self.lines.get(tuple(key[:n]))
            if line:
                return f"{self.path}:{line}"
        return str(self.path)


@dataclass(frozen=True)
class Variable:
    """One CKPTFLOW_* variable and where it was set (`environment` or `/abs/.env:3`)."""

    name: str
    value: str | None
    where: str


def read_toml(path: Path) -> TomlConfig:
    """Parse `path`; ConfigError (naming the file and what to change) when it can't be read."""
    path = _absolute(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: pass an existing TOML file to --config") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory: pass a TOML file to --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}; pass a readable UTF-8 TOML file to --config") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}; fix the file given to --config") from None
    return TomlConfig(path=path, data=data, lines=_key_lines(text))


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """First line (1-based) of each table and key path. Best effort: multi-line strings are skipped."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_string: str | None = None
    for number, line in enumerate(text.splitlines(), start=1):
        if in_string:
            if line.count(in_string) % 2 == 1:
                in_string = None
            continue
        if m := _TABLE.match(line):
            table = _split_key(m["name"])
            lines.setdefault(table, number)
        elif m := _KEY.match(line):
            path = table + _split_key(m["key"])
            for n in range(len(table) + 1, len(path) + 1):
                lines.setdefault(path[:n], number)
        for quote in ('"""', "'''"):
            if line.count(quote) % 2 == 1:
                in_string = quote
    return lines


def _split_key(key: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in key.split("."))


def _nearest(word: str, candidates: Iterable[str]) -> str | None:
    pool = list(candidates)
    by_lower = {c.lower(): c for c in pool}
    match = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[match[0]] if match else None


def _groups_with(schema: Schema, name: str) -> list[str]:
    return [g for g, fields in schema.items() if fields and name.lower() in fields]


def unknown_toml_names(config: TomlConfig, schema: Schema) -> list[str]:
    """One message per unknown section or key: file:line, the name, the nearest valid name."""
    problems = []
    groups = {g.lower(): g for g in schema}
    dotted = [f"{g}.{f}" for g, fields in schema.items() for f in sorted(fields or ())]
    for key, value in config.data.items():
        group = groups.get(key.lower())
        if group is None:
            owners = _groups_with(schema, key)
            if owners:
                hint = f"it belongs in a section: put it under [{owners[0]}] (`{owners[0]}.{key.lower()}`)"
            else:
                near = _nearest(key, [*schema, *dotted])
                hint = f"did you mean `{near}`?" if near else f"valid sections and keys: {', '.join(schema)}"
            kind = "section" if isinstance(value, dict) else "key"
            problems.append(f"{config.where(key)}: unknown {kind} `{key}`; {hint}")
            continue
        fields = schema[group]
        if fields is None or not isinstance(value, dict):
            continue  # a plain setting, or a wrong type that validation reports
        for name in value:
            if name in fields:
                continue
            near = _nearest(name, fields)
            owners = [g for g in _groups_with(schema, name) if g != group]
            if owners:  # an exact name in another section beats a near one here
                hint = f"it belongs under [{owners[0]}] (`{owners[0]}.{name.lower()}`)"
            elif near:
                hint = f"did you mean `{group}.{near}`?"
            else:
                hint = f"[{group}] has: {', '.join(sorted(fields))}"
            problems.append(f"{config.where(key, name)}: unknown key `{name}` in [{group}]; {hint}")
    return problems


def override_names(overrides: Mapping[str, Any], schema: Schema) -> list[str]:
    """Unknown names among explicit overrides (CLI options, flow parameters)."""
    return unknown_toml_names(TomlConfig(path=Path("override"), data=dict(overrides)), schema)


# -- variables -----------------------------------------------------------------------------


def env_variables(environ: Mapping[str, str], prefix: str) -> list[Variable]:
    """The CKPTFLOW_* variables of the environment (matched case-insensitively, as pydantic-settings does)."""
    return [Variable(k, v, "environment") for k, v in environ.items() if k.upper().startswith(prefix)]


def dotenv_variables(path: Path, prefix: str) -> list[Variable]:
    """The CKPTFLOW_* assignments of a .env file, each with `/abs/.env:LINE`."""
    if not path.is_file():
        return []
    from dotenv.parser import parse_stream

    where = path.absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {where}: {exc}; fix or remove that .env file") from None
    return [
        Variable(b.key, b.value, f"{where}:{_binding_line(b.original)}")
        for b in parse_stream(io.StringIO(text))
        if b.key and b.key.upper().startswith(prefix)
    ]


def _binding_line(original: Any) -> int:
    # python-dotenv folds blank lines before an assignment into it; count from the assignment itself.
    blank = 0
    for line in original.string.splitlines():
        if line.strip():
            break
        blank += 1
    return original.line + blank


def _valid_variable_names(schema: Schema, prefix: str, delimiter: str) -> list[str]:
    names = []
    for top, fields in schema.items():
        if fields is None:
            names.append(f"{prefix}{top.upper()}")
        else:
            names += [f"{prefix}{top.upper()}{delimiter}{f.upper()}" for f in sorted(fields)]
    return names


def variable_setting(name: str, schema: Schema, prefix: str, delimiter: str) -> tuple[str, ...] | None:
    """`CKPTFLOW_TRAIN__SEED` → ("train", "seed"); `CKPTFLOW_TRAIN` (a JSON group) → ("train",); else None."""
    parts = name.upper().removeprefix(prefix).lower().split(delimiter)
    top = parts[0]
    if top not in schema:
        return None
    fields = schema[top]
    if len(parts) == 1:
        return (top,)
    if len(parts) == 2 and fields is not None and parts[1] in fields:
        return (top, parts[1])
    return None


def unknown_variable_names(variables: Iterable[Variable], schema: Schema, prefix: str, delimiter: str) -> list[str]:
    """One message per CKPTFLOW_* variable that is neither a setting nor one of ckptflow's own variables."""
    valid = _valid_variable_names(schema, prefix, delimiter)
    problems = []
    for var in variables:
        upper = var.name.upper()
        if upper in NON_SETTING_VARIABLES or upper.startswith(NON_SETTING_PREFIXES):
            continue
        if variable_setting(var.name, schema, prefix, delimiter) is not None:
            continue
        problems.append(f"{var.where}: unknown variable {var.name}; {_variable_hint(upper, valid, prefix, delimiter)}")
    return problems


def _variable_hint(upper: str, valid: list[str], prefix: str, delimiter: str) -> str:
    rest = upper.removeprefix(prefix)
    if delimiter not in rest:  # CKPTFLOW_CHECKPOINT_SAVE_STEPS: a group needs a double underscore
        for i, ch in enumerate(rest):
            candidate = f"{prefix}{rest[:i]}{delimiter}{rest[i + 1:]}"
            if ch == "_" and candidate in valid:
                return f"a group and its field are separated by a double underscore: did you mean {candidate}?"
    near = _nearest(upper, valid)
    if near:
        return f"did you mean {near}?"
    return f"every {prefix}* variable must be a setting (.env.example lists them all)"


# -- relative paths --------------------------------------------------------------------------


def resolve_toml_paths(config: TomlConfig, schema: Schema) -> dict[str, Any]:
    """The file's data with relative paths made absolute against the file's directory.

    Paths: data.train, data.eval, home, a sqlite ledger_url's database file, and
    model.name_or_path when it is a path (`./x`, `../x`, `~/x`, or an existing directory
    next to the file; a hub id such as `gpt2` or `org/name` stays a hub id).
    """
    base = config.path.parent
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in config.data.items()}
    for key in _PATH_KEYS:
        _update(data, key, lambda v: _resolve_path(v, base))
    _update(data, ("model", "name_or_path"), lambda v: _resolve_model(v, base))
    _update(data, ("ledger_url",), lambda v: _resolve_sqlite_url(v, base))
    return data


def _update(data: dict[str, Any], key: tuple[str, ...], fn) -> None:
    holder: Any = data
    for part in key[:-1]:
        holder = holder.get(part)
        if not isinstance(holder, dict):
            return
    value = holder.get(key[-1])
    if isinstance(value, str) and value:
        holder[key[-1]] = fn(value)


def _absolute(path: Path) -> Path:
    # Normalizes `..` without resolving symlinks: the path the user wrote, made absolute.
    return Path(os.path.abspath(path.expanduser()))


def _resolve_path(value: str, base: Path) -> str:
    if value.startswith(_BUILTIN_PREFIX):
        return value
    return str(_absolute(base / Path(value).expanduser()))  # an absolute value stays as it is


def _resolve_model(value: str, base: Path) -> str:
    if value.startswith(_BUILTIN_PREFIX):
        return value
    looks_like_path = value.startswith(("./", "../", "~", "/")) or value in (".", "..")
    if looks_like_path or (base / value).is_dir():
        return _resolve_path(value, base)
    return value


def _resolve_sqlite_url(url: str, base: Path) -> str:
    """`sqlite:///ledger.db` → `sqlite:////abs/dir/ledger.db`; other URLs unchanged."""
    m = re.match(r"^(sqlite(\+\w+)?:///)([^?]*)(\?.*)?$", url)
    if not m or not m[3] or m[3] == ":memory:" or m[3].startswith(("/", "file:")):
        return url
    return f"{m[1]}{_absolute(base / Path(m[3]).expanduser())}{m[4] or ''}"
