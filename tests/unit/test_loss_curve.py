"""The loss-curve SVG: parsed back with xml.etree, its structure, ticks, thinning and edge cases."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from ckptflow.loss_curve import HEIGHT, MAX_POINTS, WIDTH, render_loss_curve, thin

SVG = "{http://www.w3.org/2000/svg}"


def _log(train_steps, eval_steps=()) -> list[dict]:
    return [{"step": s, "loss": 6.0 - 0.001 * s, "learning_rate": 1e-3} for s in train_steps] + [
        {"step": s, "eval_loss": 5.5 - 0.001 * s} for s in eval_steps
    ]


def _parse(svg: str | None) -> ET.Element:
    assert svg is not None
    return ET.fromstring(svg)


def _vertices(root: ET.Element, cls: str) -> list[tuple[float, float]]:
    (line,) = [p for p in root.iter(f"{SVG}polyline") if p.get("class") == cls]
    return [tuple(map(float, xy.split(","))) for xy in line.get("points").split()]


def _texts(root: ET.Element, cls: str) -> list[str]:
    return [t.text for t in root.iter(f"{SVG}text") if t.get("class") == cls]


@pytest.mark.parametrize(
    ("train", "evals", "legend"),
    [
        (range(1, 41), range(10, 41, 10), ["train loss", "eval loss"]),
        (range(1, 5), [], ["train loss"]),
        ([], [2, 4], ["eval loss"]),
        ([3], [3], ["train loss", "eval loss"]),
    ],
)
def test_one_polyline_vertex_per_logged_loss_and_a_legend_entry_per_series(train, evals, legend):
    root = _parse(render_loss_curve(_log(train, evals), "demo"))
    plotted = [p.get("class") for p in root.iter(f"{SVG}polyline") if p.get("class") != "legend-sample"]
    assert plotted == [label.replace(" ", "-") for label in legend]
    if train:
        assert len(_vertices(root, "train-loss")) == len(train)
    if evals:
        assert len(_vertices(root, "eval-loss")) == len(evals)
    assert _texts(root, "legend") == legend
    assert _texts(root, "title") == ["demo"]
    assert _texts(root, "x-label") == ["optimizer step"] and _texts(root, "y-label") == ["loss"]
    assert (root.get("width"), root.get("height")) == (str(WIDTH), str(HEIGHT))


@pytest.mark.parametrize("steps", [[1], [1, 2], [2, 4], [1, 2, 3, 4], [10, 20, 30], list(range(1, 4001))])
def test_step_ticks_are_whole_numbers(steps):
    labels = _texts(_parse(render_loss_curve(_log(steps, steps[-1:]), "t")), "x-tick")
    assert len(labels) >= 2 and all(label.lstrip("-").isdigit() for label in labels), labels
    ticks = [int(label) for label in labels]
    assert ticks == sorted(set(ticks)) and ticks[0] <= steps[0] and ticks[-1] >= steps[-1] - (steps[-1] - steps[0]) / 6


@pytest.mark.parametrize(("lo", "hi"), [(6.93, 4.56), (2.0, 1.999), (0.0012, 0.0009), (120.0, 3.0), (3.0, 3.0)])
def test_loss_ticks_are_evenly_spaced_1_2_5_steps(lo, hi):
    root = _parse(render_loss_curve([{"step": 1, "loss": lo}, {"step": 2, "loss": hi}], "t"))
    ticks = [float(label) for label in _texts(root, "y-tick")]
    assert len(ticks) >= 3, ticks
    gaps = {round(b - a, 12) for a, b in zip(ticks, ticks[1:])}
    assert len({f"{g:.6g}" for g in gaps}) == 1, ticks
    mantissa = f"{gaps.pop():.0e}"[0]
    assert mantissa in "125", ticks
    assert ticks[0] <= min(lo, hi) + (ticks[1] - ticks[0]) and ticks[-1] >= max(lo, hi) - (ticks[1] - ticks[0])


@pytest.mark.parametrize(
    "log",
    [
        [{"step": 1, "learning_rate": 0.1}],
        [],
        [{"step": 1, "loss": float("nan")}, {"step": 2, "eval_loss": float("inf")}],
        [{"loss": 2.0}, {"step": None, "loss": 2.0}, {"step": 3, "loss": None}, {"step": 4, "loss": True}],
    ],
)
def test_nothing_to_plot_is_none(log):
    assert render_loss_curve(log, "t") is None


def test_non_finite_losses_are_skipped_and_the_rest_stays_on_the_canvas():
    log = _log(range(1, 11), [5, 10])
    log[2]["loss"], log[5]["loss"], log[-1]["eval_loss"] = float("nan"), float("inf"), float("-inf")
    svg = render_loss_curve(log, "t")
    root = _parse(svg)
    assert len(_vertices(root, "train-loss")) == 8 and len(_vertices(root, "eval-loss")) == 1
    assert "nan" not in svg and "inf" not in svg
    for x, y in _vertices(root, "train-loss") + _vertices(root, "eval-loss"):
        assert 0 <= x <= WIDTH and 0 <= y <= HEIGHT


@pytest.mark.parametrize("log", [_log([7]), _log([5, 6, 7]), [{"step": s, "loss": 0.0} for s in (1, 2, 3)]])
def test_a_single_point_or_a_flat_line_is_drawn_inside_the_plot(log):
    root = _parse(render_loss_curve(log, "t"))
    vertices = _vertices(root, "train-loss")
    assert len(vertices) == len(log)
    assert all(60 < x < WIDTH - 10 and 30 < y < HEIGHT - 45 for x, y in vertices), vertices


def test_a_hostile_title_is_escaped_and_the_svg_still_parses():
    title = """run"><script>alert('x')</script>&amp; <!-- \x01 ]]>"""
    svg = render_loss_curve(_log([1, 2]), title)
    root = _parse(svg)
    assert _texts(root, "title") == [title.replace("\x01", "")]
    assert "<script" not in svg and "&lt;script&gt;alert(&apos;x&apos;)&lt;/script&gt;&amp;amp;" in svg
    assert not list(root.iter(f"{SVG}script"))


def test_a_long_history_is_thinned_and_stays_small():
    steps = list(range(1, 100_001))
    log = _log(steps, steps[::1000])
    log[41_234]["loss"] = 50.0  # one spike among 100,000 steps
    svg = render_loss_curve(log, "t")
    train = _vertices(_parse(svg), "train-loss")
    assert len(train) <= MAX_POINTS
    assert min(y for _, y in train) < 60  # the spike survived thinning (drawn near the top)
    assert len(svg.encode()) < 40_000


@pytest.mark.parametrize("n", [3, 999, 1000, 1001, 4000, 12_345])
def test_thin_keeps_first_and_last_in_step_order(n):
    points = [(float(s), math.sin(s)) for s in range(n)]
    kept = thin(points)
    assert len(kept) <= MAX_POINTS and kept[0] == points[0] and kept[-1] == points[-1]
    assert [x for x, _ in kept] == sorted({x for x, _ in kept})
    assert kept == points if n <= MAX_POINTS else set(kept) <= set(points)


@pytest.mark.parametrize(
    ("log", "corner"),
    [
        (_log(range(1, 41)), "top right"),  # a falling curve leaves the top right free
        (  # an eval line along the top right: the first free corner
            [{"step": 1, "loss": 5.8}, {"step": 4, "loss": 5.8}]
            + [{"step": 2, "eval_loss": 6.9}, {"step": 4, "eval_loss": 6.9}],
            "top left",
        ),
        ([{"step": s, "loss": 1.0 + s} for s in range(1, 41)], "top left"),  # a rising curve crosses the top right
    ],
)
def test_the_legend_sits_in_a_corner_the_curves_leave_free(log, corner):
    root = _parse(render_loss_curve(log, "t"))
    (box,) = [r for r in root.iter(f"{SVG}rect") if r.get("stroke") == "#ccc"]
    x, y = float(box.get("x")), float(box.get("y"))
    assert ("top" if y < HEIGHT / 2 else "bottom") + " " + ("left" if x < WIDTH / 2 else "right") == corner
