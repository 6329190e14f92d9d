"""pipeline/report/plots.py: the report's charts keep their axes whatever the legend holds."""

import warnings

from pipeline.report.plots import learning_curves_chart, legend_columns


def test_learning_curves_with_long_run_labels_keep_their_axes():
    """Cross pseudo-labelling's six students (``fold0 iteration_1 half_0``, ...) in the two-panel chart:
    the legend gets one column and its own rows; matplotlib's constrained layout collapsed the axes
    (and warned) when six long labels were squeezed into four columns under a 3.4-inch figure."""
    losses = {f"fold{k} iteration_1 half_{h}": ([0, 1], [0.9 - 0.1 * k, 0.7]) for k in range(3) for h in range(2)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svg = learning_curves_chart("pseudo", losses, {"every fold": ([0, 1], [1e-3, 1e-4])}, "step")
    assert all(svg.count(label) == 1 for label in losses)


def test_legend_columns_fit_the_longest_label():
    assert legend_columns(["fold0", "fold1", "fold2"], 3.0) == 3  # the folds' one row, as before
    assert legend_columns(["fold0 iteration_1 half_0"] * 6, 3.0) == 1
    assert legend_columns(["a"] * 9, 10.0) == 4  # never more than four
    assert legend_columns([], 3.0) == 1
