"""Property tests: any run name or `--out` path is either refused (exit 2), or every path derived from it stays inside its root.

Most examples run against the library functions; a bounded handful go through the real CLI.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptflow.errors import BadInputError
from ckptflow.export import PROVENANCE_NAME, ExportTargetError, check_export_target
from ckptflow.paths import RUN_NAME_PATTERN, contained, is_within, validate_run_name
from ckptflow.settings import Settings
from tests.badinput import ckptflow, tree

# Characters that matter to paths and shells, plus any unicode.
_TRICKY = st.sampled_from(["/", "\\", ".", "..", "\n", "\x00", " ", "-", "_", "~", "$", "*", ":", "[", "]", "é", "٣"])
NAMES = st.one_of(
    st.text(max_size=120),
    st.lists(st.one_of(_TRICKY, st.text(alphabet="ab0.-_", min_size=1, max_size=4)), max_size=30).map("".join),
    st.from_regex(RUN_NAME_PATTERN, fullmatch=True),  # mostly valid names, some too long
)
# --out: relative or absolute, made of the segments that lead to ckptflow's own directories.
_SEGMENTS = st.sampled_from(["..", ".", "home", "runs", "base", "checkpoints", "checkpoint-2", "exports", "builtin",
                             "data-cache", "ledger.db", "x", "file.txt", "foreign", "empty", "link"])
OUTS = st.tuples(st.sampled_from(["", "/", "{root}/"]), st.lists(_SEGMENTS, max_size=6)).map(
    lambda t: t[0] + "/".join(t[1])
)
_FAST = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A home with a run, an export and the other own dirs, beside a file, a foreign dir, an empty dir and a symlink."""
    r = tmp_path_factory.mktemp("prop")
    home = r / "home"
    for d in ("runs/base/checkpoints/checkpoint-2", "exports/base", "builtin", "data-cache"):
        (home / d).mkdir(parents=True)
    (home / "exports" / "base" / PROVENANCE_NAME).write_text("{}")
    (home / "ledger.db").write_bytes(b"")
    (r / "file.txt").write_text("mine")
    (r / "foreign").mkdir()
    (r / "foreign" / "notes").write_text("mine")
    (r / "empty").mkdir()
    (r / "link").symlink_to(home / "runs")
    return r


@_FAST
@given(name=NAMES)
def test_a_name_is_refused_or_all_its_paths_stay_inside_their_roots(name, root):
    settings = Settings(home=root / "home")
    try:
        validate_run_name(name)
    except BadInputError:
        valid = False
    else:
        valid = True
    runs, exports = (root / "home" / "runs").resolve(), (root / "home" / "exports").resolve()
    derived = {
        settings.run_dir: runs,
        settings.checkpoints_dir: runs,
        settings.quarantine_dir: runs,
        settings.export_dir: exports,
    }
    for derive, inside in derived.items():
        try:
            path = derive(name)
        except BadInputError:
            assert not valid, f"valid name {name!r} refused by {derive.__name__}"
            continue
        assert valid, f"invalid name {name!r} accepted by {derive.__name__}"
        assert inside in path.resolve().parents


@_FAST
@given(name=NAMES)
def test_contained_alone_never_escapes_even_without_name_validation(name, root):
    """Defence in depth: paths.contained with any string either refuses or stays strictly inside."""
    base = root / "home" / "runs"
    try:
        path = contained(base, name)
    except BadInputError:
        return
    assert base.resolve() in path.resolve().parents


@_FAST
@given(out=OUTS, force=st.booleans())
def test_an_out_path_is_refused_or_is_a_safe_new_empty_or_export_dir(out, force, root, monkeypatch):
    monkeypatch.chdir(root)
    home = root / "home"
    target = Path(out.replace("{root}", str(root)) or ".")
    try:
        real = check_export_target(target, home=home, ledger_file=home / "ledger.db", explicit=True, force=force)
    except ExportTargetError:
        return
    for own in ("runs", "builtin", "data-cache"):
        assert not is_within(real, home / own)
    assert real != (home / "exports").resolve()
    assert not is_within(home, real) and not is_within(home / "ledger.db", real)
    assert not real.exists() or real.is_dir()
    if real.is_dir() and any(real.iterdir()):
        assert (real / PROVENANCE_NAME).is_file() and force
    tmp = contained(real.parent, f".{real.name}.tmp-0-1")  # where the export's temp dir goes: beside it
    assert tmp.parent == real.parent


# -- the real CLI: a bounded handful ---------------------------------------------------------
@pytest.mark.slow
@settings(max_examples=6, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=NAMES.filter(lambda n: "\x00" not in n), out=OUTS)
def test_cli_export_exits_2_without_traceback_and_writes_nothing_outside_home(name, out, root):
    """No run exists, so every combination is refused (bad name, bad --out, or an unknown run) and nothing changes."""
    before = tree(root)
    args = ["export", "--out", out.replace("{root}", str(root)) or ".", "--", name]
    proc = ckptflow(*args, cwd=root, env={"CKPTFLOW_HOME": str(root / "home")}, timeout=120)
    assert proc.returncode == 2, (args, proc.stderr)
    assert "Traceback" not in proc.stdout + proc.stderr
    after = tree(root)
    assert {k: v for k, v in after.items() if not k.startswith("home")} == {
        k: v for k, v in before.items() if not k.startswith("home")
    }


@pytest.mark.slow
@settings(max_examples=6, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=NAMES.filter(lambda n: "\x00" not in n))
def test_cli_checkpoints_refuses_or_answers_without_touching_the_tree(name, root):
    before = tree(root)
    proc = ckptflow("checkpoints", "--", name, cwd=root, env={"CKPTFLOW_HOME": str(root / "home")}, timeout=120)
    assert proc.returncode == 2, proc.stderr  # a bad name, or no run of that name
    assert "Traceback" not in proc.stdout + proc.stderr
    assert {k: v for k, v in tree(root).items() if not k.startswith("home")} == {
        k: v for k, v in before.items() if not k.startswith("home")
    }
