"""The loss curve as SVG text: train and eval loss by optimizer step, drawn by string building.

Replaces matplotlib, whose import (~0.45 s of CPU) and figure + savefig (~0.08 s per render) ran on
the live watcher thread while training, taking CPU from the two torch threads. Pure and stdlib-only:
a log history in, an SVG document (or None) out; reports.py writes the file.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["MAX_POINTS", "render_loss_curve", "thin"]

# Canvas (px): the size of the PNG it replaces (6 x 3.5 in at 100 dpi).
WIDTH, HEIGHT = 600, 350
# Plot area inside the canvas: room for the title above, tick labels and axis labels left and below.
_LEFT, _RIGHT, _TOP, _BOTTOM = 62, 585, 34, 300
# Gap (px) between the axis frame and the outermost data points, so end markers are not cut in half.
_INSET = 6
# At most this many points per series: a 100,000-step log stays a few tens of KB (thinned per bucket).
MAX_POINTS = 1000
# How many intervals between ticks each axis aims for (the nearest 1-2-5 step gives 4 to 10).
_TICKS = 6
# Grid lines: light, as matplotlib's grid(alpha=0.3) was (each line also serves as the tick mark).
_GRID = 'stroke-opacity="0.15"'
# Markers are drawn on series of at most this many points; denser ones would merge into a band hiding the line.
_MARKERS_UP_TO = 200
# Series: log key, legend label, colour (matplotlib's first two defaults), marker radius (px).
_SERIES = (
    ("loss", "train loss", "#1f77b4", 2.0),
    ("eval_loss", "eval loss", "#ff7f0e", 3.0),
)
# Characters XML 1.0 forbids even escaped (control characters): dropped so the SVG always parses.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
# XML's predefined entities (xml.sax.saxutils.escape would import the xml.sax package, ~9 ms).
_ENTITIES = (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ('"', "&quot;"), ("'", "&apos;"))
# Longest title drawn (characters); the rest is elided so it stays on the canvas.
_TITLE_MAX = 80

Point = tuple[float, float]


def render_loss_curve(log_history: list[dict[str, Any]], title: str) -> str | None:
    """An SVG of train and eval loss by step (whole-number step ticks, 1-2-5 loss ticks); None when no
    entry has both a finite step and a finite loss. NaN/inf losses are skipped; long series are thinned."""
    series = [(label, colour, radius, thin(_points(log_history, key))) for key, label, colour, radius in _SERIES]
    series = [s for s in series if s[3]]
    if not series:
        return None
    points = [p for *_, pts in series for p in pts]
    x_axis = _Axis(min(x for x, _ in points), max(x for x, _ in points), whole=True)
    y_axis = _Axis(min(y for _, y in points), max(y for _, y in points), whole=False)
    to_px = _scale(x_axis, y_axis)
    centre_x, centre_y = (_LEFT + _RIGHT) / 2, (_TOP + _BOTTOM) / 2
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Arial, sans-serif" font-size="11">',
        _markers(series),
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        *_grid_and_ticks(x_axis, y_axis, to_px),
        f'<rect x="{_LEFT}" y="{_TOP}" width="{_RIGHT - _LEFT}" height="{_BOTTOM - _TOP}" fill="none" stroke="#333"/>',
        *(_polyline(i, label, colour, pts, to_px) for i, (label, colour, _, pts) in enumerate(series)),
        *_legend(series, to_px),
        f'<text class="x-label" x="{centre_x:g}" y="{HEIGHT - 8}" text-anchor="middle" font-size="12">'
        "optimizer step</text>",
        f'<text class="y-label" x="14" y="{centre_y:g}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 14 {centre_y:g})">loss</text>',
        f'<text class="title" x="{centre_x:g}" y="22" text-anchor="middle" font-size="14">{_xml_text(title)}</text>',
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


def thin(points: list[Point], limit: int = MAX_POINTS) -> list[Point]:
    """At most `limit` points, first and last kept: per bucket of consecutive points the lowest and highest
    loss (in step order), so a spike survives thinning where every-nth sampling could drop it."""
    if len(points) <= limit:
        return points
    inner, buckets = points[1:-1], max(1, (limit - 2) // 2)
    size = len(inner) / buckets
    kept = [points[0]]
    for b in range(buckets):
        chunk = inner[int(b * size) : int((b + 1) * size)]
        if chunk:
            low, high = min(chunk, key=lambda p: p[1]), max(chunk, key=lambda p: p[1])
            kept += sorted({low, high})
    return kept + [points[-1]]


def _points(log_history: list[dict[str, Any]], key: str) -> list[Point]:
    """(step, loss) of the entries that log `key`, in step order; non-numeric or non-finite values skipped."""
    out = []
    for entry in log_history:
        step, value = entry.get("step"), entry.get(key)
        if _finite(step) and _finite(value):
            out.append((float(step), float(value)))
    return sorted(out, key=lambda p: p[0])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Axis:
    """An axis range [lo, hi] and its ticks: the multiples of a nice 1-2-5 `step` inside the range.

    1. Give a flat range (one point, equal losses) some width: ±1 step, or ±10% of the loss.
    2. Steps (`whole`) span the data (down to a tick just below it); losses get 5% headroom at both ends.
    3. Pick the 1-2-5 step nearest (in ratio) to 1/_TICKS of the range (a whole number when `whole`).
    """

    def __init__(self, lo: float, hi: float, *, whole: bool) -> None:
        if hi - lo < (2 if whole else 1e-12):
            pad = 1.0 if whole else max(abs(lo) * 0.1, 0.1)
            lo, hi = lo - pad, hi + pad
        elif not whole:
            lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
        self.lo, self.hi = lo, hi
        raw = (hi - lo) / _TICKS
        magnitude = 10 ** math.floor(math.log10(raw))
        step = min((m * magnitude for m in (1, 2, 5, 10)), key=lambda c: abs(math.log(c / raw)))
        self.step = max(1.0, round(step)) if whole else step
        if whole and lo - math.floor(lo / self.step) * self.step <= 0.05 * (hi - lo):
            self.lo = math.floor(lo / self.step) * self.step  # steps 1..4000 start at a 0 tick
        first, last = math.ceil(self.lo / self.step - 1e-9), math.floor(hi / self.step + 1e-9)
        self.ticks = [k * self.step for k in range(first, last + 1)]

    def label(self, value: float) -> str:
        """A tick label with as many decimals as the step needs (0.2 -> one, 0.05 -> two, 5 -> none)."""
        decimals = max(0, -math.floor(math.log10(self.step) + 1e-9))
        text = f"{value:.{decimals}f}"
        return "0" if float(text) == 0 else text  # no "-0.0"


def _scale(x: _Axis, y: _Axis):
    """Data -> pixel coordinates; the axis ends are drawn _INSET px inside the frame."""
    width, height = _RIGHT - _LEFT - 2 * _INSET, _BOTTOM - _TOP - 2 * _INSET

    def to_px(step: float, loss: float) -> Point:
        return (
            _LEFT + _INSET + (step - x.lo) / (x.hi - x.lo) * width,
            _BOTTOM - _INSET - (loss - y.lo) / (y.hi - y.lo) * height,
        )

    return to_px


def _grid_and_ticks(x_axis: _Axis, y_axis: _Axis, to_px) -> Iterable[str]:
    for x in x_axis.ticks:
        px, _ = to_px(x, y_axis.lo)
        yield f'<line x1="{px:.1f}" y1="{_TOP}" x2="{px:.1f}" y2="{_BOTTOM + 4}" stroke="#000" {_GRID}/>'
        yield f'<text class="x-tick" x="{px:.1f}" y="{_BOTTOM + 17}" text-anchor="middle">{x_axis.label(x)}</text>'
    for y in y_axis.ticks:
        _, py = to_px(x_axis.lo, y)
        yield f'<line x1="{_LEFT - 4}" y1="{py:.1f}" x2="{_RIGHT}" y2="{py:.1f}" stroke="#000" {_GRID}/>'
        yield f'<text class="y-tick" x="{_LEFT - 7}" y="{py + 4:.1f}" text-anchor="end">{y_axis.label(y)}</text>'


def _markers(series) -> str:
    """One <marker> per series: the polyline's vertices get it via marker-start/mid/end (no element per point)."""
    defs = [
        f'<marker id="m{i}" viewBox="-4 -4 8 8" markerWidth="{2 * r}" markerHeight="{2 * r}" '
        f'markerUnits="userSpaceOnUse"><circle r="4" fill="{colour}"/></marker>'
        for i, (_, colour, r, _) in enumerate(series)
    ]
    return "<defs>" + "".join(defs) + "</defs>"


def _polyline(index: int, label: str, colour: str, points: list[Point], to_px) -> str:
    coords = " ".join(f"{px:.1f},{py:.1f}" for px, py in (to_px(x, y) for x, y in points))
    marked = len(points) <= _MARKERS_UP_TO
    markers = "".join(f' marker-{where}="url(#m{index})"' for where in ("start", "mid", "end")) if marked else ""
    return (
        f'<polyline class="{label.replace(" ", "-")}" fill="none" stroke="{colour}" stroke-width="1.5" '
        f'stroke-linejoin="round" points="{coords}"{markers}/>'
    )


def _legend(series, to_px) -> Iterable[str]:
    """A line-and-marker sample and the label per series, in the plot corner the curves cross least."""
    width, height = 92, 8 + 16 * len(series)
    x, y = _legend_corner(series, to_px, width, height)
    yield f'<rect x="{x}" y="{y}" width="{width}" height="{height}" fill="white" fill-opacity="0.8" stroke="#ccc"/>'
    for i, (label, colour, _, _) in enumerate(series):
        row = y + 13 + 16 * i
        sample = f"{x + 6},{row - 4} {x + 16},{row - 4} {x + 26},{row - 4}"  # the middle vertex carries the marker
        yield (
            f'<polyline class="legend-sample" fill="none" stroke="{colour}" stroke-width="1.5" points="{sample}" '
            f'marker-mid="url(#m{i})"/>'
        )
        yield f'<text class="legend" x="{x + 32}" y="{row}">{label}</text>'


def _legend_corner(series, to_px, width: int, height: int) -> tuple[int, int]:
    """Top-left (x, y) of the legend: of the four plot corners (top right first, as matplotlib's "best" tries),
    the one whose box the fewest curve segments may cross (a segment counts when its bounding box overlaps)."""
    left, right, top, bottom = _LEFT + 8, _RIGHT - 8 - width, _TOP + 8, _BOTTOM - 8 - height
    corners = [(right, top), (left, top), (right, bottom), (left, bottom)]
    segments = []
    for *_, points in series:
        pixels = [to_px(px, py) for px, py in points]
        segments += list(zip(pixels, pixels[1:] or pixels))

    def crossings(corner: tuple[int, int]) -> int:
        x, y = corner
        return sum(
            1
            for (ax, ay), (bx, by) in segments
            if min(ax, bx) <= x + width and max(ax, bx) >= x and min(ay, by) <= y + height and max(ay, by) >= y
        )

    return min(corners, key=crossings)  # min keeps the first of equals: top right when nothing is crossed


def _xml_text(text: str) -> str:
    """`text` safe inside an element: markup characters escaped, characters XML cannot hold dropped, elided."""
    text = _NOT_XML.sub("", text)
    if len(text) > _TITLE_MAX:
        text = text[: _TITLE_MAX - 1] + "…"
    for char, entity in _ENTITIES:  # "&" first, so the entities added after are not escaped again
        text = text.replace(char, entity)
    return text
