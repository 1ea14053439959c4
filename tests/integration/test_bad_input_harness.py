"""The bad-input harness itself: a refusal that changes nothing passes; a change is caught."""

from __future__ import annotations

import pytest

from tests.badinput import Case, assert_unchanged, run_case, snapshot

pytestmark = pytest.mark.slow


def test_a_refusal_on_a_completed_home_changes_nothing(completed_home, tmp_path):
    run_case(Case("unknown-run", ("verify", "nope"), ("nope",)), home=completed_home, cwd=tmp_path)


def test_a_change_is_reported(completed_home, tmp_path):
    before = snapshot(completed_home, tmp_path)
    (completed_home / "runs" / "base" / "stray.txt").write_text("x")
    with pytest.raises(AssertionError, match="stray.txt"):
        assert_unchanged(before, snapshot(completed_home, tmp_path))
