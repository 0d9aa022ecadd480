"""The page's rendering helpers on synthetic inputs (no lab, no server)."""
from __future__ import annotations

import pytest

from app import render


@pytest.mark.parametrize("n_edits", [0, 11, 12, 40, 200])
def test_accuracy_plot_draws_any_number_of_edits(n_edits):
    curve = [0.8 - 0.001 * i for i in range(n_edits + 1)]
    figure = render.accuracy_plot(curve, "editable", 1000)
    figure.canvas.draw()  # ticks are laid out here
    ticks = figure.axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)
    assert len(ticks) <= 13
