"""What people read: loss-curve ticks and rounded table metrics."""

from __future__ import annotations

import pytest

from ckptflow.reports import _rounded, loss_curve_figure, loss_curve_png


@pytest.mark.parametrize("steps", [[1, 2, 3, 4], [2, 4], [10, 20, 30], [1]])
def test_loss_curve_step_ticks_are_whole_numbers(steps):
    import matplotlib.pyplot as plt

    log = [{"step": s, "loss": 6.0 - 0.1 * s} for s in steps] + [{"step": steps[-1], "eval_loss": 5.5}]
    fig = loss_curve_figure(log, "t")
    ticks = fig.axes[0].get_xticks()
    plt.close(fig)
    assert len(ticks) >= 1
    assert all(float(t).is_integer() for t in ticks), ticks


def test_nothing_to_plot_writes_nothing(tmp_path):
    assert loss_curve_png([{"step": 1, "learning_rate": 0.1}], tmp_path / "c.png", "t") is None
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize(
    ("value", "shown"), [(6.892061710357666, 6.89206), (0.000123456789, 0.000123457), (4, 4), (None, None), ("x", "x")]
)
def test_table_metrics_are_rounded_for_people(value, shown):
    assert _rounded(value) == shown
