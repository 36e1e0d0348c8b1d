"""The eval report's PNGs stay readable: the figures are laid out, drawn and measured here (matplotlib Agg)."""

from __future__ import annotations

import numpy as np


def _boxes(fig, texts):
    fig.canvas.draw()
    return [t.get_window_extent() for t in texts if t.get_text()]


def test_subset_chart_of_many_subsets_keeps_every_label_whole_and_apart():
    """PandaLM has 52 subsets (names such as 'sth related to real estate'): before, all sat on a 5 x 4 inch figure,
    the labels overlapped each other and the longest were cut at the figure's left edge."""
    from rmlab.report import subset_figure

    rng = np.random.default_rng(0)
    names = [f"subset number {i} " + "x" * (i % 7) for i in range(50)] + ["sth related to real estate", "(Wolfram alpha)?"]
    fig = subset_figure({n: (float(rng.uniform()), 10) for n in names})
    ax = fig.axes[0]
    labels = ax.get_yticklabels()
    boxes = _boxes(fig, labels)
    assert len(boxes) == len(names)
    width = fig.bbox.width
    assert all(b.x0 >= 0 and b.x1 <= width for b in boxes)  # no label cut at the figure's edge
    ys = sorted((b.y0, b.y1) for b in boxes)
    assert all(lo_next >= hi - 0.5 for (_, hi), (lo_next, _) in zip(ys, ys[1:]))  # no two labels overlap
    assert [t.get_text() for t in labels][-2] == "sth related to real estate"  # a name of 26 characters stays whole


def test_reward_histogram_legend_covers_no_bar():
    """Before, the legend sat in the upper right, on the bars of the highest rewards."""
    from rmlab.report import histogram_figure

    rng = np.random.default_rng(1)
    fig = histogram_figure(rng.normal(0.5, 1.0, 800), rng.normal(0.0, 1.0, 800))
    ax = fig.axes[0]
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    bars = [p.get_window_extent() for p in ax.patches if p.get_height() > 0]
    assert bars
    assert not any(legend.overlaps(b) for b in bars)
