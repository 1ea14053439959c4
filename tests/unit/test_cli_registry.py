"""The CLI's command list is the design's, and the README documents every command."""

from pathlib import Path

from ckptflow.cli import app

# design.md's commands (retrain included), plus `rollback` (issue 12: the previous champion back).
DESIGN_COMMANDS = {"run", "retrain", "plan", "runs", "checkpoints", "verify", "prune", "export", "rollback", "serve"}
README = Path(__file__).resolve().parents[2] / "README.md"


def test_cli_has_exactly_the_design_commands():
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert names == DESIGN_COMMANDS


def test_readme_documents_every_command():
    text = README.read_text()
    for name in DESIGN_COMMANDS:
        assert f"`ckptflow {name}" in text, name


def test_flags_are_shown_as_flags_and_every_argument_is_described():
    from typer.testing import CliRunner

    runner = CliRunner()
    for command in DESIGN_COMMANDS - {"serve"}:
        text = runner.invoke(app, [command, "--help"]).output
        assert "<bool>" not in text, (command, text)
        if "{RUN}" in text:
            assert "RUN <str>  Run name" in text, (command, text)
