"""Run-name grammar, contained path resolution, and the export-target rules, on real directories."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from ckptflow.errors import BadInputError
from ckptflow.export import PROVENANCE_NAME, ExportTargetError, check_export_target
from ckptflow.params import RunName
from ckptflow.paths import (
    RUN_NAME_MAX_LENGTH,
    InvalidRunNameError,
    PathOutsideRootError,
    contained,
    validate_run_name,
)
from ckptflow.settings import Settings

VALID = [
    "base",
    "a",
    "0",
    "run-2",
    "my_run.v1",
    "A.b_c-d",
    "x.",  # one trailing dot is a plain file name
    "1.2.3",
    "run-" + "f" * 10,
    "a" * RUN_NAME_MAX_LENGTH,
]

INVALID = [
    ("", "empty"),
    (".", "starts with '.'"),
    ("..", "contains '..'"),
    ("../escape", "contains '..'"),
    ("a..b", "contains '..'"),
    ("a/..", "contains '..'"),
    ("/srv/x", "starts with '/'"),
    ("a/b", "contains '/'"),
    ("a\\b", "contains '\\\\'"),
    ("a\nb", "contains '\\n'"),
    ("base\n", "contains '\\n'"),
    ("a\x00b", "contains '\\x00'"),
    ("-rf", "starts with '-'"),
    (".hidden", "starts with '.'"),
    ("_x", "starts with '_'"),
    ("a b", "contains ' '"),
    (" a", "starts with ' '"),
    ("a\t", "contains '\\t'"),
    ("ünïcode", "starts with 'ü'"),
    ("rün", "contains 'ü'"),
    ("run٣", "contains '٣'"),  # a non-ASCII digit
    ("ｆｕｌｌ", "starts with 'ｆ'"),
    ("a:b", "contains ':'"),
    ("a*", "contains '*'"),
    ("$HOME", "starts with '$'"),
    ("~", "starts with '~'"),
    ("a" * (RUN_NAME_MAX_LENGTH + 1), "101 characters"),
    ("x" * 300, "300 characters"),
]


@pytest.mark.parametrize("name", VALID)
def test_valid_names_pass_every_check(name, tmp_path):
    assert validate_run_name(name) == name
    assert TypeAdapter(RunName).validate_python(name) == name
    settings = Settings(home=tmp_path)
    assert settings.run_dir(name) == tmp_path / "runs" / name
    assert settings.checkpoints_dir(name) == tmp_path / "runs" / name / "checkpoints"
    assert settings.quarantine_dir(name) == tmp_path / "runs" / name / "quarantine"
    assert settings.export_dir(name) == tmp_path / "exports" / name


@pytest.mark.parametrize(("name", "problem"), INVALID, ids=[repr(n)[:24] for n, _ in INVALID])
def test_invalid_names_are_refused_with_the_grammar_and_the_name(name, problem, tmp_path):
    with pytest.raises(InvalidRunNameError) as caught:
        validate_run_name(name)
    message = str(caught.value)
    assert isinstance(caught.value, BadInputError)
    assert repr(name)[:60].rstrip("'") in message  # repr: a newline shows as \n
    assert problem in message
    assert "letters, digits, '.', '_' and '-'" in message and "--run-name" in message
    assert "\n" not in message
    with pytest.raises(ValidationError):  # the flow parameter (and the Prefect UI form's schema)
        TypeAdapter(RunName).validate_python(name)
    settings = Settings(home=tmp_path)
    for derive in (settings.run_dir, settings.checkpoints_dir, settings.quarantine_dir, settings.export_dir):
        with pytest.raises(BadInputError):
            derive(name)


@pytest.mark.parametrize(
    ("name", "suffix", "ok"),
    [("a" * 98, "-2", True), ("a" * 99, "-2", False), ("a" * 97, "-10", True), ("a" * 98, "-10", False)],
)
def test_names_stay_within_the_limit_after_the_new_suffix(name, suffix, ok):
    if ok:
        assert validate_run_name(name, suffix=suffix) == name
    else:
        with pytest.raises(InvalidRunNameError, match="shorter --run-name"):
            validate_run_name(name, suffix=suffix)


def test_the_parameter_schema_carries_the_grammar():
    schema = TypeAdapter(RunName).json_schema()
    assert schema["maxLength"] == RUN_NAME_MAX_LENGTH and schema["minLength"] == 1
    assert "(?=" not in schema["pattern"] and "(?!" not in schema["pattern"]  # JavaScript and Rust regex alike
    import re

    for name in VALID:
        assert re.fullmatch(schema["pattern"], name)
    for name, _ in INVALID:
        assert not (re.fullmatch(schema["pattern"], name) and len(name) <= RUN_NAME_MAX_LENGTH)


@pytest.mark.parametrize(
    "parts",
    [("..",), ("../x",), ("/etc",), ("a", "..", ".."), (".",), ("",), ("a/../..",), ("link",), ("link", "x")],
)
def test_contained_refuses_anything_outside_or_equal_to_its_root(parts, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(tmp_path)  # a symlink leading out of the root
    with pytest.raises(PathOutsideRootError, match="not inside"):
        contained(root, *parts)


@pytest.mark.parametrize("parts", [("a",), ("a", "b"), ("a/b",), ("a/../b",), ("inner",)])
def test_contained_returns_the_plain_join_inside(parts, tmp_path):
    root = tmp_path / "root"
    (root / "x").mkdir(parents=True)
    (root / "inner").symlink_to(root / "x")  # a symlink that stays inside is fine
    assert contained(root, *parts) == root.joinpath(*parts)


def test_a_symlinked_home_is_followed_not_refused(tmp_path):
    real = tmp_path / "real-home"
    real.mkdir()
    (tmp_path / "home").symlink_to(real)
    assert Settings(home=tmp_path / "home").run_dir("r") == tmp_path / "home" / "runs" / "r"


# -- export targets ------------------------------------------------------------------------
@pytest.fixture
def home(tmp_path):
    h = tmp_path / "home"
    for d in ("runs/base/checkpoints/checkpoint-2", "exports/base", "builtin", "data-cache"):
        (h / d).mkdir(parents=True)
    (h / "ledger.db").write_bytes(b"")
    (h / "exports" / "base" / PROVENANCE_NAME).write_text("{}")
    return h


def _check(target: Path, home: Path, *, explicit: bool = True, force: bool = False) -> Path:
    return check_export_target(target, home=home, ledger_file=home / "ledger.db", explicit=explicit, force=force)


@pytest.mark.parametrize(
    ("target", "setup", "message"),
    [
        ("file.txt", "file", "is a file"),
        ("foreign", "foreign", "did not write"),
        ("home/runs/base/checkpoints", None, "which ckptflow manages"),
        ("home/runs/base/checkpoints/new", None, "which ckptflow manages"),
        ("home/runs", None, "which ckptflow manages"),
        ("home/builtin", None, "which ckptflow manages"),
        ("home/data-cache/x", None, "which ckptflow manages"),
        ("home", None, "contains"),
        (".", None, "contains"),
        ("/", None, "contains"),
        ("home/ledger.db", None, "contains"),
        ("home/exports", None, "every run's export"),
        ("home/exports/base", None, "pass --force"),
        ("link-to-runs", "link", "which ckptflow manages"),
    ],
)
def test_export_targets_ckptflow_must_not_touch_are_refused(target, setup, message, home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if setup == "file":
        (tmp_path / target).write_text("mine")
    elif setup == "foreign":
        (tmp_path / target).mkdir()
        (tmp_path / target / "notes.txt").write_text("mine")
    elif setup == "link":
        (tmp_path / target).symlink_to(home / "runs" / "base")
    with pytest.raises(ExportTargetError, match=message):
        _check(Path(target), home)


@pytest.mark.parametrize(
    ("target", "explicit", "force"),
    [
        ("new-dir", True, False),
        ("empty", True, False),
        ("home/exports/base", True, True),
        ("home/exports/base", False, False),  # the default target: ckptflow's own, replaced without --force
        ("home/exports/other", False, False),
        ("elsewhere/deep/new", True, False),
    ],
)
def test_export_targets_that_are_new_empty_or_earlier_exports_pass(target, explicit, force, home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    assert _check(Path(target), home, explicit=explicit, force=force) == (tmp_path / target).resolve()


def test_the_default_target_is_refused_when_ckptflow_did_not_write_it(home):
    (home / "exports" / "mine").mkdir()
    (home / "exports" / "mine" / "weights.bin").write_bytes(b"x")
    with pytest.raises(ExportTargetError, match="pass --out DIR"):
        _check(home / "exports" / "mine", home, explicit=False)


@pytest.mark.parametrize(
    ("name", "accepted"),
    [("base", True), ("odd.name-1_", True), ("..", False), ("a/b", False), ("a" * 101, False), ("", False)],
)
def test_the_finetune_deployment_form_refuses_bad_names(name, accepted):
    """The flow's parameter schema (what the Prefect UI form and deployment runs validate against) holds the grammar."""
    import jsonschema
    from prefect.utilities.callables import parameter_schema

    from flows.finetune import finetune

    schema = parameter_schema(finetune.fn).model_dump_for_openapi()
    document = {"run_name": name}
    if accepted:
        jsonschema.validate(document, schema)
    else:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(document, schema)
