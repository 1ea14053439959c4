"""The CLI's command list is the design's, and the README documents every command."""

from pathlib import Path

from ckptflow.cli import app

DESIGN_COMMANDS = {"run", "plan", "runs", "checkpoints", "verify", "prune", "export", "serve"}
README = Path(__file__).resolve().parents[2] / "README.md"


def test_cli_has_exactly_the_design_commands():
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert names == DESIGN_COMMANDS


def test_readme_documents_every_command():
    text = README.read_text()
    for name in DESIGN_COMMANDS:
        assert f"`ckptflow {name}" in text, name
