"""What people read: the loss-curve file and its inlined data URI, and rounded table metrics."""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET

import pytest

from ckptflow.reports import LOSS_CURVE_SVG, _rounded, loss_curve_svg, svg_data_uri


def test_loss_curve_is_written_as_svg_and_inlined_as_an_svg_data_uri(tmp_path):
    log = [{"step": 1, "loss": 2.0}, {"step": 2, "eval_loss": 1.5}]
    out = loss_curve_svg(log, tmp_path / "run" / LOSS_CURVE_SVG, "r")
    assert out == tmp_path / "run" / "loss-curve.svg"
    assert ET.parse(out).getroot().tag == "{http://www.w3.org/2000/svg}svg"
    uri = svg_data_uri(out)
    assert uri.startswith("data:image/svg+xml;base64,")
    assert base64.b64decode(uri.split(",", 1)[1]) == out.read_bytes()


def test_nothing_to_plot_writes_nothing(tmp_path):
    assert loss_curve_svg([{"step": 1, "learning_rate": 0.1}], tmp_path / "c.svg", "t") is None
    assert not (tmp_path / "c.svg").exists()


@pytest.mark.parametrize(
    ("value", "shown"), [(6.892061710357666, 6.89206), (0.000123456789, 0.000123457), (4, 4), (None, None), ("x", "x")]
)
def test_table_metrics_are_rounded_for_people(value, shown):
    assert _rounded(value) == shown
