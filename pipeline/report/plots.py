"""Charts and plot data.

The report's charts are drawn with matplotlib and embedded as inline SVG (text kept as text), so the
page opens offline, stays sharp at any width and needs no server. The small CSV files under
``reports/plots/`` are what DVC's own views read (``plots:`` in dvc.yaml, ``dvc plots show/diff``):
DVC's Vega templates draw one line per file, field and revision, so every table here has fixed column
names (a fold count or a model list in a column name would need a dvc.yaml per config).

Learning curves come from Lightning's ``CSVLogger`` files (``models/<model>/fold<k>/logs/metrics.csv``):
one row per logging call, NaN in the columns that call did not log. Epoch-level figures
(``train/loss``, ``train/lr``) carry an ``epoch``; ``LearningRateMonitor`` rows (``lr-<optimizer>[/<group>]``)
carry only a ``step``.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.registry import model_rank

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Series = tuple[list[float], list[float]]  # (x, y)

# Readable at the page's width; the browser draws the text (svg.fonttype none), in the page's own font
# when DejaVu Sans is missing.
STYLE: dict[str, Any] = {
    "svg.fonttype": "none",
    "font.family": ["DejaVu Sans", "sans-serif"],
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.dpi": 100,
}
MAX_BARS = 40  # a longer bar chart (many groups) shows the worst ones


def natural_key(text: str) -> list[Any]:
    """``fold10`` after ``fold2``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text)]


# ---------------------------------------------------------------------------- rendering


@contextmanager
def styled() -> Iterator[None]:
    """rcParams are read when artists are made, so figures are built (and saved) inside this."""
    import matplotlib

    with matplotlib.rc_context(STYLE):
        yield


def new_figure(width: float, height: float, layout: str = "constrained") -> Figure:
    """A figure not registered with pyplot (no global state, no GUI backend), laid out so titles,
    tick labels and outside legends never overlap or get cut off (``compressed``: for square cells)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout=layout)
    # Room at the edges: the browser's glyphs can run a little past matplotlib's own text metrics.
    fig.get_layout_engine().set(w_pad=0.08, h_pad=0.08)
    return fig


def to_svg(fig: Figure, title: str) -> str:
    """Inline ``<svg>`` markup for the page. Element ids are salted with the chart title, so the same
    inputs give the same bytes and two charts on one page never share an id."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": title}):
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    label = html.escape(title, quote=True)
    return text[text.index("<svg"):].replace("<svg ", f"<svg class='chart' role='img' aria-label='{label}' ", 1).strip()


# A legend column's width at legend.fontsize 9 (DejaVu Sans), measured: the line sample, padding and column
# spacing, then per character of its label; and a row's height.
LEGEND_ENTRY_IN, LEGEND_CHAR_IN, LEGEND_ROW_IN = 0.62, 0.062, 0.2


def legend_columns(labels: Sequence[str], width_in: float) -> int:
    """As many legend columns (at most 4) as fit ``width_in`` inches with the longest label."""
    widest = LEGEND_ENTRY_IN + LEGEND_CHAR_IN * max(map(len, labels), default=0)
    return max(1, min(len(labels), 4, int(width_in // widest)))


def legend_below(ax: Axes, n_entries: int, ncols: int | None = None) -> None:
    """The legend under the axes, never on the curves."""
    if n_entries:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=ncols or min(n_entries, 4), frameon=False)


def plot_series(ax: Axes, curves: dict[str, Series], integer_x: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    for name, (x, y) in curves.items():
        ax.plot(x, y, marker="o" if len(x) <= 12 else None, markersize=3.5, linewidth=1.5, label=name)
    if integer_x:  # epochs and steps: no 0.25 ticks
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        xs = [v for x, _ in curves.values() for v in x]
        if xs and max(xs) - min(xs) < 1:  # a single epoch: a unit-wide axis around it
            ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)


def short_number(value: float, _position: int | None = None) -> str:
    """Tick labels like 0.001 and 3e-05: learning rates without a separate offset label."""
    return f"{value:.3g}"


# ---------------------------------------------------------------------------- charts


def learning_curves_chart(model: str, losses: dict[str, Series], rates: dict[str, Series], rate_x: str,
                          loss_x: str = "epoch") -> str:
    """Loss by epoch beside the learning rate, one line per run (fold, pseudo iteration), legends below.
    Long labels (``fold0 iteration_1 half_0``) get fewer legend columns and the figure the rows' height:
    a legend taller than its room collapses the axes."""
    width = 6.0 if rates else 3.6
    panel = width / (2 if rates else 1)  # a legend, centred under its axes, may use its half of the figure
    legends = [list(losses), *([list(rates)] if rates else [])]
    columns = [legend_columns(labels, panel) for labels in legends]
    rows = max(-(-len(labels) // n) for labels, n in zip(legends, columns, strict=True))
    with styled():
        fig = new_figure(width, 3.4 + LEGEND_ROW_IN * max(rows - 1, 0))
        axes = fig.subplots(1, 2 if rates else 1, squeeze=False)[0]
        plot_series(axes[0], losses, integer_x=True)
        axes[0].set(title="Loss", xlabel=loss_x, ylabel="log loss (cross-entropy)")
        legend_below(axes[0], len(losses), columns[0])
        if rates:
            plot_series(axes[1], rates, integer_x=True)
            values = np.concatenate([np.asarray(y, dtype=float) for _, y in rates.values()])
            positive = values[values > 0]
            if len(positive) and positive.max() / positive.min() > 20:
                axes[1].set_yscale("log")  # warm-ups and one-cycle schedules span decades
            elif len(positive) and positive.max() == positive.min():
                axes[1].set_ylim(0, positive.max() * 1.5)  # a constant rate: its value, not 1e-05 +- 4%
            axes[1].yaxis.set_major_formatter(short_number)
            axes[1].set(title="Learning rate", xlabel=rate_x, ylabel="learning rate")
            legend_below(axes[1], len(rates), columns[1])
        fig.suptitle(f"{model}: learning curves", fontweight="bold")
        return to_svg(fig, f"{model}: learning curves")


def confusion_chart(matrix: np.ndarray, classes: Sequence[str], title: str) -> str:
    """Counts on a colour scale of each true class's share (rows sum to 1), class names on both axes."""
    n = len(classes)
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = float(np.clip(0.42 * n + 2.0, 4.5, 12.0))
    with styled():
        fig = new_figure(size + 1.3, size, layout="compressed")
        ax = fig.subplots()
        image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        ax.grid(False)
        ax.set_xticks(range(n), [str(c) for c in classes], rotation=45 if max(map(len, classes)) > 3 else 0,
                      ha="right" if max(map(len, classes)) > 3 else "center")
        ax.set_yticks(range(n), [str(c) for c in classes])
        ax.set(xlabel="predicted class", ylabel="true class", title=title)
        if n <= 25:  # beyond that the numbers no longer fit their cells
            for (i, j), count in np.ndenumerate(matrix):
                if count:
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=8 if n > 12 else 9,
                            color="white" if share[i, j] > 0.55 else "#222")
        fig.colorbar(image, ax=ax, shrink=0.85, label="share of the true class")
        return to_svg(fig, title)


def bar_chart(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str,
              counts: Sequence[int] | None = None, reference: float | None = None,
              reference_label: str = "all images", unit: str = "{:.3f}") -> str:
    """Horizontal bars, first label on top, each bar's value (and image count) at its end; ``reference``
    draws a dashed line (e.g. the overall log loss) with its legend below."""
    labels, values = list(labels), [float(v) for v in values]
    height = 1.3 + 0.27 * len(labels)
    with styled():
        fig = new_figure(6.4, height)
        ax = fig.subplots()
        positions = np.arange(len(labels))
        ax.barh(positions, values, color="#4c78a8", height=0.7)
        ax.set_yticks(positions, labels)
        ax.invert_yaxis()
        ax.grid(axis="y", visible=False)
        ax.set(xlabel=xlabel, title=title)
        hi = max(values + [reference or 0.0, 1e-9])
        ax.set_xlim(0, hi * 1.3)  # room for the value labels
        for i, value in enumerate(values):
            text = unit.format(value) + (f"  (n = {counts[i]})" if counts is not None else "")
            ax.text(value + hi * 0.01, i, text, va="center", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.6, "alpha": 0.85})  # over the line
        if reference is not None:
            ax.axvline(reference, color="#d62728", linestyle="--", linewidth=1.2,
                       label=f"{reference_label}: {unit.format(reference)}")
            legend_below(ax, 1)
        return to_svg(fig, title)


def reliability_chart(confidence: Sequence[float], accuracy: Sequence[float], count: Sequence[int], title: str) -> str:
    """Accuracy against mean confidence per bin over the diagonal (perfect calibration), and below it
    the number of images in each bin (a point on 3 images means little)."""
    with styled():
        fig = new_figure(6.0, 5.0)
        top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
        top.plot([0, 1], [0, 1], linestyle="--", color="#888", linewidth=1, label="perfect calibration")
        top.plot(confidence, accuracy, marker="o", markersize=4, linewidth=1.5, color="#1f77b4",
                 label="accuracy per confidence bin")
        top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy", title=title)
        bottom.bar(confidence, count, width=0.06, color="#4c78a8")
        bottom.set(xlabel="confidence (top-class probability)", ylabel="images")
        handles, labels = top.get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=2, frameon=False)
        return to_svg(fig, title)


def timings_chart(stages: Sequence[str], seconds: Sequence[float], title: str) -> str:
    return bar_chart(stages, seconds, title, "seconds", unit="{:.1f} s")


# ---------------------------------------------------------------------------- Lightning logs

LOG_PATTERNS = ("pretrain/logs/metrics.csv", "*/fold*/logs/metrics.csv", "*/fold*/iteration_*/logs/metrics.csv",
                "*/fold*/iteration_*/half_*/logs/metrics.csv")


def training_logs(models_dir: Path) -> dict[str, list[tuple[str, Path]]]:
    """model -> [(run, Lightning metrics.csv)]: pretrain's log, each fold model's (run ``fold<k>``),
    pseudo's per fold, iteration and student (``fold<k> iteration_<i>[ half_<h>]``); models in DAG
    order (``registry.model_rank``), runs in natural order."""
    found: dict[str, list[tuple[str, Path]]] = {}
    if not models_dir.is_dir():
        return found
    for pattern in LOG_PATTERNS:
        for path in models_dir.glob(pattern):
            parts = path.relative_to(models_dir).parts  # model, [fold<k>, [iteration_<i>]], logs, metrics.csv
            found.setdefault(parts[0], []).append((" ".join(parts[1:-2]) or parts[0], path))
    return {model: sorted(found[model], key=lambda run: natural_key(run[0])) for model in sorted(found, key=model_rank)}


def read_log(path: Path) -> pd.DataFrame | None:
    """A Lightning CSV log, or None when it is empty or unreadable (a run killed while writing it)."""
    try:
        log = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError):
        return None
    log.columns = [str(c) for c in log.columns]
    return log


def series(log: pd.DataFrame, x: str, columns: Sequence[str]) -> dict[str, Series]:
    """Per-``x`` series of ``columns`` (the last value logged at each x), non-finite points dropped (a
    diverged run draws up to where it diverged)."""
    if x not in log.columns:
        return {}
    found = {}
    for column in columns:
        points = log[[x, column]].apply(pd.to_numeric, errors="coerce").replace([np.inf, -np.inf], np.nan).dropna()
        points = points.groupby(x)[column].last()
        if len(points):
            found[column] = (points.index.astype(float).tolist(), points.astype(float).tolist())
    return found


def loss_columns(columns: Sequence[str], validated: bool) -> list[str]:
    """Training losses, and validation losses where the run validated on held-out rows of its own."""
    return [c for c in columns if "loss" in c and (validated or c.startswith("train/"))]


def monitor_lr_columns(columns: Sequence[str]) -> list[str]:
    """``LearningRateMonitor`` columns: ``lr-<optimizer>`` or ``lr-<optimizer>/<param group>``."""
    return [c for c in columns if c.startswith("lr-")]


def own_lr_columns(columns: Sequence[str]) -> list[str]:
    """The module's own per-epoch rates: ``.../lr`` (the first param group's), not the monitor's."""
    return [c for c in columns if c.rsplit("/", 1)[-1].startswith("lr") and not c.startswith("lr-")]


def learning_rates(log: pd.DataFrame) -> tuple[str, dict[str, Series]]:
    """(x axis, group -> series): the ``LearningRateMonitor``'s per-step rates of every param group when
    the log has them, else the module's own per-epoch ``.../lr`` (the first group's)."""
    monitored = monitor_lr_columns(log.columns)
    found = series(log, "step", monitored) if monitored else {}
    if found:
        return "step", {column.removeprefix("lr-"): points for column, points in found.items()}
    return "epoch", series(log, "epoch", own_lr_columns(log.columns))


def without_duplicates(curves: dict[str, Series]) -> dict[str, Series]:
    """Folds usually share one schedule: keep the first of identical curves."""
    kept: dict[str, Series] = {}
    for name, points in curves.items():
        if points not in kept.values():
            kept[name] = points
    return kept


def fold_mean(curves: Sequence[Series]) -> Series:
    """Mean over runs at each x (a run stopped early counts up to where it stopped)."""
    frame = pd.concat([pd.Series(y, index=x) for x, y in curves if len(x)], axis=1) if curves else pd.DataFrame()
    if frame.empty:
        return ([], [])
    mean = frame.mean(axis=1).sort_index()
    return (mean.index.astype(float).tolist(), mean.astype(float).tolist())


def run_group(run: str) -> str:
    """Runs averaged together for DVC's plots: the folds of one model, and the two students of a cross
    pseudo-labelling iteration (``fold1 iteration_2 half_0`` -> ``iteration_2``; ``fold0`` -> ``""``)."""
    return " ".join(part for part in run.split() if not re.fullmatch(r"fold\d+|half_\d+", part))


def legend_label(run: str, model: str, column: str, several_columns: bool) -> str:
    """``fold0``; ``fold0 valid`` when the model logs several losses; ``train`` for pretrain's own log."""
    kind = column.split("/", 1)[0] if "/" in column else column
    parts = ([] if run == model else [run]) + ([kind] if several_columns or run == model else [])
    return " ".join(parts) or column


def rate_lines(per_run: dict[str, dict[str, Series]]) -> dict[str, Series]:
    """Legend label -> learning-rate curve. Folds usually share one schedule: a param group whose curve
    is the same in every run is drawn once (labelled by the group, or "every fold")."""
    groups = list(dict.fromkeys(group for rates in per_run.values() for group in rates))
    lines: dict[str, Series] = {}
    for group in groups:
        short = group.rsplit("/", 1)[-1]
        curves = {run: rates[group] for run, rates in per_run.items() if group in rates}
        if len(curves) > 1 and len(without_duplicates(curves)) == 1:
            lines[short if len(groups) > 1 else "every fold"] = next(iter(curves.values()))
            continue
        for run, points in curves.items():
            lines[f"{run} {short}" if len(groups) > 1 else run] = points
    return lines


# ---------------------------------------------------------------------------- DVC plot data


def learning_tables(logs: dict[str, list[tuple[str, Path]]]) -> tuple[dict[str, pd.DataFrame], dict[str, pd.DataFrame]]:
    """(plot name -> ``epoch,train_loss``, plot name -> ``step,lr``) for ``dvc plots``: per model (and
    pseudo iteration when it has several), the training loss averaged over folds, and the learning rate
    of the top param group averaged over folds. A model whose logs have no learning rate gets no rate table."""
    losses: dict[str, pd.DataFrame] = {}
    rates: dict[str, pd.DataFrame] = {}
    for model, runs in logs.items():
        loss_runs: dict[str, list[Series]] = {}
        rate_runs: dict[str, list[Series]] = {}
        for run, path in runs:
            log = read_log(path)
            if log is None:
                continue
            name = "_".join([model, *("" if run == model else run_group(run)).split()])
            loss = series(log, "epoch", [c for c in log.columns if c == "train/loss"])
            if loss:
                loss_runs.setdefault(name, []).append(loss["train/loss"])
            rate = top_group_rate(log)
            if rate is not None:
                rate_runs.setdefault(name, []).append(rate)
        if len(loss_runs | rate_runs) == 1:  # one group (the usual case): the model's own name
            (only,) = loss_runs | rate_runs
            loss_runs = {model: loss_runs[only]} if only in loss_runs else {}
            rate_runs = {model: rate_runs[only]} if only in rate_runs else {}
        for name, curves in loss_runs.items():
            x, y = fold_mean(curves)
            if x:
                losses[name] = pd.DataFrame({"epoch": np.asarray(x, dtype=int), "train_loss": y})
        for name, curves in rate_runs.items():
            x, y = fold_mean(curves)
            if x:
                rates[name] = pd.DataFrame({"step": np.asarray(x, dtype=int), "lr": y})
    return losses, rates


def top_group_rate(log: pd.DataFrame) -> Series | None:
    """The learning rate of the param group with the largest one (the head's under layer-wise decay) by
    optimizer step: the monitor's, else the module's per-epoch rate placed at the step it was logged."""
    monitored = series(log, "step", monitor_lr_columns(log.columns))
    if monitored:
        return max(monitored.values(), key=lambda points: max(points[1]))
    return next(iter(series(log, "step", own_lr_columns(log.columns)[:1]).values()), None)


def confusion_rows(labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """One row per image, ``actual,predicted`` class names: DVC's ``confusion`` template counts them."""
    names = np.asarray(list(classes), dtype=object)
    return pd.DataFrame({"actual": names[labels], "predicted": names[predicted]})


def calibration_table(confidence: Sequence[float], accuracy: Sequence[float], count: Sequence[int],
                      n_bins: int = 10) -> pd.DataFrame:
    """One row per non-empty confidence bin: its range, mean confidence, accuracy, image count, and
    ``perfectly_calibrated`` (= the confidence: DVC draws it as the diagonal to compare against)."""
    edges = [min(int(c * n_bins), n_bins - 1) for c in confidence]
    return pd.DataFrame({
        "bin": [f"{e / n_bins:.1f}-{(e + 1) / n_bins:.1f}" for e in edges],
        "confidence": [round(float(c), 6) for c in confidence],
        "accuracy": [round(float(a), 6) for a in accuracy],
        "perfectly_calibrated": [round(float(c), 6) for c in confidence],
        "count": [int(n) for n in count],
    })
