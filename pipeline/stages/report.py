"""``report`` stage: collect every stage's figures into ``reports/metrics.json`` (a map of stage name
to figures, DAG order, DVC metrics) and render ``reports/report.html``, one static page that opens
offline: inline CSS, plots as inline SVG (no plotting library needed), thumbnails as base64 JPEG.

Sections: log loss per stage; ensemble and smoothing; learning curves (every Lightning
``metrics.csv`` under ``models/``); then, on the best validation predictions available (calibrate >
ensemble > pseudo > finetune > head): confusion matrix, per-class log loss, reliability diagram and
the course's five views (random correct, random incorrect, most correct per class, most incorrect
per class, most uncertain). Every section says what it is waiting for when its inputs are absent
(the stage can run right after ``sample``).
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.competition import TRAIN_INDEX, label_indices, read_competition
from pipeline.config import Config, item_stage
from pipeline.errors import StageError
from pipeline.io import atomic_write_text
from pipeline.metrics import KAGGLE_EPS, collect_stage_metrics, prediction_classes, read_predictions
from pipeline.registry import STAGES

SCORE_KEYS = ("valid_logloss", "valid_acc", "test_logloss", "test_acc")
PREDICTION_SOURCES = ("calibrate", "ensemble", "pseudo", "finetune", "head")
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
THUMB_SIZE = (128, 96)
N_RANDOM = 8
N_UNCERTAIN = 8
STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:75em;color:#222}table{border-collapse:collapse;margin:.5em 0}"
    "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f3f3f3}"
    ".note{color:#666;font-style:italic}.grid{display:flex;flex-wrap:wrap;gap:.5em}"
    "figure{margin:0;width:132px;font-size:11px}figure img,.noimg{width:128px;height:96px;display:block;background:#eee}"
    ".ok{color:#2a7d2a}.bad{color:#b22}.cm td{text-align:right;min-width:2.2em}svg{font-size:11px}"
    ".charts{display:flex;flex-wrap:wrap;gap:1em}"
)


# ---------------------------------------------------------------------------- helpers


def format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return "<table>" + "".join(f"<tr><td>{html.escape(str(k))}</td><td>{format_value(v)}</td></tr>"
                                   for k, v in value.items()) + "</table>"
    return html.escape(str(value))


def note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"


def stage_order(members: list[int]) -> list[str]:
    """The current DAG in order, each foreach item (``member@0``...) right after its stage."""
    order: list[str] = []
    for stage in STAGES:
        order.append(stage)
        if stage == "member":
            order += [item_stage(stage, m) for m in members]
    return order


def collect_metrics(folder: Path, members: list[int]) -> dict[str, dict]:
    """Figures of the stages in the current DAG only: a file left by a stage or member that has
    since been removed from the config is stale and must not reach metrics.json."""
    return collect_stage_metrics(folder, stage_order(members))


# ---------------------------------------------------------------------------- SVG charts


def scale(values: np.ndarray, lo: float, hi: float, out_lo: float, out_hi: float) -> np.ndarray:
    span = hi - lo if hi > lo else 1.0
    return out_lo + (np.asarray(values, dtype=float) - lo) / span * (out_hi - out_lo)


def line_chart(series: dict[str, tuple[list[float], list[float]]], title: str, xlabel: str, ylabel: str,
               diagonal: bool = False, limits: tuple[float, float, float, float] | None = None,
               width: int = 460, height: int = 280) -> str:
    """Polylines with markers, axes with min/max ticks, a legend; ``diagonal`` draws y = x."""
    left, right, top, bottom = 50, 10, 24, 36
    xs = np.concatenate([np.asarray(x, float) for x, _ in series.values()]) if series else np.zeros(1)
    ys = np.concatenate([np.asarray(y, float) for _, y in series.values()]) if series else np.zeros(1)
    x0, x1, y0, y1 = limits or (float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max()))
    px = lambda v: scale(v, x0, x1, left, width - right)  # noqa: E731
    py = lambda v: scale(v, y0, y1, height - bottom, top)  # noqa: E731
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img'>",
             f"<text x='{width / 2}' y='15' text-anchor='middle' font-weight='bold'>{html.escape(title)}</text>",
             f"<rect x='{left}' y='{top}' width='{width - left - right}' height='{height - top - bottom}' fill='none' stroke='#999'/>",
             f"<text x='{width / 2}' y='{height - 4}' text-anchor='middle'>{html.escape(xlabel)}</text>",
             f"<text x='12' y='{height / 2}' text-anchor='middle' transform='rotate(-90 12 {height / 2})'>{html.escape(ylabel)}</text>"]
    for value, anchor in ((x0, "start"), (x1, "end")):
        parts.append(f"<text x='{px(value):.1f}' y='{height - bottom + 13}' text-anchor='{anchor}'>{value:.3g}</text>")
    for value in (y0, y1):
        parts.append(f"<text x='{left - 4}' y='{py(value) + 4:.1f}' text-anchor='end'>{value:.3g}</text>")
    if diagonal:
        parts.append(f"<line x1='{px(x0):.1f}' y1='{py(y0):.1f}' x2='{px(x1):.1f}' y2='{py(y1):.1f}' stroke='#aaa' stroke-dasharray='4'/>")
    for i, (name, (x, y)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px(x), py(y), strict=True))
        parts.append(f"<polyline points='{points}' fill='none' stroke='{colour}' stroke-width='1.5'/>")
        parts += [f"<circle cx='{a:.1f}' cy='{b:.1f}' r='2.5' fill='{colour}'/>" for a, b in zip(px(x), py(y), strict=True)]
        parts.append(f"<text x='{left + 8}' y='{top + 14 + 13 * i}' fill='{colour}'>{html.escape(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(labels: list[str], values: list[float], title: str, width: int = 460, bar_height: int = 18) -> str:
    """Horizontal bars, one per label, value printed at the end of each bar."""
    left, right, top = 150, 50, 24
    height = top + bar_height * len(labels) + 8
    hi = max(max(values, default=0.0), 1e-9)
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img'>",
             f"<text x='{width / 2}' y='15' text-anchor='middle' font-weight='bold'>{html.escape(title)}</text>"]
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = top + i * bar_height
        w = (width - left - right) * value / hi
        parts += [f"<text x='{left - 4}' y='{y + 13}' text-anchor='end'>{html.escape(label)}</text>",
                  f"<rect x='{left}' y='{y + 2}' width='{w:.1f}' height='{bar_height - 4}' fill='{COLOURS[0]}'/>",
                  f"<text x='{left + w + 4:.1f}' y='{y + 13}'>{value:.3f}</text>"]
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------------------- stage figures


def score_table(metrics: dict[str, dict]) -> str:
    rows = [(stage, figs) for stage, figs in metrics.items() if any(k in figs for k in SCORE_KEYS)]
    if not rows:
        return "<p>No stage has produced predictions yet.</p>"
    head = "".join(f"<th>{k}</th>" for k in SCORE_KEYS)
    body = "".join(
        f"<tr><td>{html.escape(stage)}</td>" + "".join(f"<td>{format_value(figs.get(k, ''))}</td>" for k in SCORE_KEYS) + "</tr>"
        for stage, figs in rows
    )
    return f"<table><tr><th>stage</th>{head}</tr>{body}</table>"


def ensemble_section(metrics: dict[str, dict]) -> str:
    figs = metrics.get("ensemble")
    if not figs:
        return note("Waiting for the ensemble stage (reports/stages/ensemble.json).")
    members = figs.get("members", {})
    weights = figs.get("weights", {})
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{format_value(float(weights.get(name, 0.0)))}</td>"
        + "".join(f"<td>{format_value(m.get(k, metrics.get(name, {}).get(k, '')))}</td>"  # fine-tuned: TTA in member@<m>
                  for k in ("valid_logloss", "test_logloss", "tta_used")) + "</tr>"
        for name, m in members.items()
    )
    table = (f"<table><tr><th>member</th><th>weight</th><th>valid_logloss</th><th>test_logloss</th><th>TTA kept</th></tr>"
             f"{rows}</table>") if rows else ""
    weighting = "fitted" if figs.get("fit_weights") else "equal"
    kind = {"finetune": "fine-tuned CNNs", "head": "dense heads on the feature cache"}.get(figs.get("member_model"), "?")
    lines = [f"{figs.get('mean', '?')} mean of {figs.get('n_members', len(members))} members "
             f"(the member@&lt;m&gt; stages are {kind}), {weighting} weights; "
             f"ensemble valid log loss {format_value(figs.get('valid_logloss', ''))}, "
             f"best single member {html.escape(str(figs.get('best_member', '?')))} "
             f"{format_value(figs.get('best_member_valid_logloss', ''))}. "
             f"Cross-fitted over validation groups (weights chosen on the others): fitted weights "
             f"{format_value(figs.get('valid_logloss_crossfit_fitted', ''))}, equal weights "
             f"{format_value(figs.get('valid_logloss_crossfit_equal', ''))}."]
    if "smoothing_valid_logloss_before" in figs:
        applied = figs.get("smoothing_applied")
        verdict = "<b class='ok'>applied</b>" if applied else "<b class='bad'>not applied</b> (it did not lower validation log loss)"
        cells = "".join(
            f"<tr><td>{split}</td>" + "".join(f"<td>{format_value(figs.get(f'smoothing_{split}_{m}_{w}', ''))}</td>"
                                              for m in ("logloss", "acc") for w in ("before", "after")) + "</tr>"
            for split in ("valid", "test") if f"smoothing_{split}_logloss_before" in figs
        )
        lines.append(f"Test-neighbour smoothing (k = {format_value(figs.get('smoothing_k', ''))}, the best of 1 to "
                     f"{format_value(figs.get('neighbours', ''))} on validation): {verdict}.")
        table += ("<table><tr><th>smoothing</th><th>log loss before</th><th>log loss after</th><th>acc before</th>"
                  f"<th>acc after</th></tr>{cells}</table>")
    else:
        lines.append("Test-neighbour smoothing is off (ensemble.neighbours = 0).")
    return "".join(f"<p>{line}</p>" for line in lines) + table


def figures_section(metrics: dict[str, dict]) -> str:
    parts = []
    for stage, figs in metrics.items():
        items = "".join(f"<tr><td>{html.escape(k)}</td><td>{format_value(v)}</td></tr>" for k, v in figs.items())
        parts.append(f"<h3>{html.escape(stage)}</h3><table>{items}</table>")
    return "".join(parts) or note("No stage has written figures yet.")


# ---------------------------------------------------------------------------- learning curves


def curve_series(log: pd.DataFrame) -> dict[str, tuple[list[float], list[float]]]:
    """Per-epoch loss series from a Lightning CSV log (one row per logging call, NaN elsewhere)."""
    if "epoch" not in log.columns:
        return {}
    series = {}
    for column in log.columns:
        if "loss" not in column:
            continue
        points = log[["epoch", column]].dropna().groupby("epoch")[column].last()
        if len(points):
            series[column] = (points.index.astype(float).tolist(), points.astype(float).tolist())
    return series


def learning_curves_section(models_dir: Path) -> str:
    logs = sorted(models_dir.glob("**/metrics.csv")) if models_dir.exists() else []
    charts = []
    for path in logs:
        try:
            series = curve_series(pd.read_csv(path))
        except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError):
            continue
        if series:
            charts.append(line_chart(series, str(path.relative_to(models_dir).parent), "epoch", "loss"))
    if not charts:
        return note("No training logs yet (Lightning metrics.csv under models/).")
    return f"<div class='charts'>{''.join(charts)}</div>"


# ---------------------------------------------------------------------------- validation predictions


@dataclass
class ValidPredictions:
    source: str
    ids: np.ndarray
    probs: np.ndarray
    labels: np.ndarray
    classes: list[str]

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def find_valid_predictions(cfg: Config) -> ValidPredictions | str:
    """The best final validation predictions with their labels, or why there are none."""
    split_csv = cfg.paths.path("split_csv")
    for source in PREDICTION_SOURCES:
        path = cfg.paths.path("predictions") / source / "valid.csv"
        if not path.exists():
            continue
        if not split_csv.exists():
            return f"{path} exists but {split_csv} does not: labels unknown."
        ids, probs = read_predictions(path)
        classes = prediction_classes(path)
        split = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
        # Checked in split.csv's own row order, so an unknown label is named at its row there.
        index_of = pd.Series(label_indices(split["label"].tolist(), classes, split_csv), index=split["id"])
        known = np.array([i in index_of.index for i in ids], dtype=bool)
        if not known.any():
            return f"{path}: none of its images is in {split_csv}."
        ids_arr = np.asarray(ids)[known]
        labels = index_of.loc[ids_arr].to_numpy(dtype=np.int64)
        probs = probs[known] / probs[known].sum(axis=1, keepdims=True)
        return ValidPredictions(source, ids_arr, probs, labels, classes)
    return f"No validation predictions yet (looked for {', '.join(PREDICTION_SOURCES)} under {cfg.paths.predictions}/)."


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def confusion_section(preds: ValidPredictions) -> str:
    classes = preds.classes
    matrix = confusion_matrix(preds.labels, preds.predicted, len(classes))
    row_share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    rows = []
    for i, c in enumerate(classes):
        cells = "".join(
            f"<td style='background:rgba({'40,120,180' if i == j else '200,40,40'},{row_share[i, j]:.2f})'>{matrix[i, j]}</td>"
            for j in range(len(classes)))
        rows.append(f"<tr><th>{html.escape(c)}</th>{cells}</tr>")
    return f"<p>Rows: true class; columns: predicted.</p><table class='cm'><tr><th></th>{head}</tr>{''.join(rows)}</table>"


def per_class_logloss(probs: np.ndarray, labels: np.ndarray, n_classes: int) -> list[float | None]:
    """Mean Kaggle log loss over the images of each true class (None for a class with none)."""
    p_true = np.clip(probs[np.arange(len(labels)), labels], KAGGLE_EPS, 1 - KAGGLE_EPS)
    losses = -np.log(p_true)
    return [float(losses[labels == c].mean()) if (labels == c).any() else None for c in range(n_classes)]


def per_class_section(preds: ValidPredictions) -> str:
    losses = per_class_logloss(preds.probs, preds.labels, len(preds.classes))
    present = [(c, v) for c, v in zip(preds.classes, losses, strict=True) if v is not None]
    return bar_chart([label for label, _ in present], [v for _, v in present], "log loss per true class")


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> tuple[list[float], list[float], list[int], float]:
    """Per confidence bin (top-class probability): mean confidence, accuracy, count; and the
    expected calibration error (count-weighted |accuracy - confidence|)."""
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    conf, acc, count = [], [], []
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            conf.append(float(confidence[inside].mean()))
            acc.append(float(correct[inside].mean()))
            count.append(int(inside.sum()))
    ece = float(sum(n * abs(a - c) for c, a, n in zip(conf, acc, count, strict=True)) / max(len(labels), 1))
    return conf, acc, count, ece


def calibration_section(preds: ValidPredictions) -> str:
    conf, acc, count, ece = reliability(preds.probs, preds.labels)
    chart = line_chart({"accuracy": (conf, acc)}, "reliability diagram", "confidence (top-class probability)",
                       "accuracy", diagonal=True, limits=(0.0, 1.0, 0.0, 1.0))
    counts = ", ".join(f"{c:.2f}: {n}" for c, n in zip(conf, count, strict=True))
    return (f"{chart}<p>Expected calibration error {ece:.4f}. Points under the diagonal are over-confident "
            f"(images per bin, by mean confidence: {html.escape(counts)}).</p>")


# ---------------------------------------------------------------------------- the five views


def five_views(preds: ValidPredictions, seed: int = 0) -> dict[str, list[int]]:
    """Row numbers for the course's five views. "Per class" is per predicted class, as in the course
    notebooks (most correct c: predicted c and right, highest p(c); most incorrect c: predicted c and
    wrong, highest p(c)). With ten classes "uncertain" is the smallest top-two margin."""
    rng = np.random.default_rng(seed)
    predicted, probs = preds.predicted, preds.probs
    correct = np.flatnonzero(predicted == preds.labels)
    wrong = np.flatnonzero(predicted != preds.labels)
    confidence = probs.max(axis=1)

    def most_confident(rows: np.ndarray) -> list[int]:
        return [int(rows[np.argmax(confidence[rows])])] if len(rows) else []

    views: dict[str, list[int]] = {
        "random correct": sorted(rng.choice(correct, min(N_RANDOM, len(correct)), replace=False).tolist()),
        "random incorrect": sorted(rng.choice(wrong, min(N_RANDOM, len(wrong)), replace=False).tolist()),
        "most correct per class": [],
        "most incorrect per class": [],
    }
    for c in range(len(preds.classes)):
        views["most correct per class"] += most_confident(correct[predicted[correct] == c])
        views["most incorrect per class"] += most_confident(wrong[predicted[wrong] == c])
    top2 = np.sort(probs, axis=1)[:, -2:]
    views["most uncertain"] = np.argsort(top2[:, 1] - top2[:, 0], kind="stable")[:N_UNCERTAIN].tolist()
    return views


def thumbnail_data_uri(path: Path) -> str | None:
    """A small base64 JPEG of the image (reduced-size decode), or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft("RGB", (THUMB_SIZE[0] * 2, THUMB_SIZE[1] * 2))
            image = image.convert("RGB")
            image.thumbnail(THUMB_SIZE)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=70)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_paths(cfg: Config) -> dict[str, Path]:
    """id -> file under data/raw, from ingest's train_index.csv (empty when absent)."""
    raw = cfg.paths.path("raw")
    index = raw / TRAIN_INDEX
    if not index.exists():
        return {}
    table = pd.read_csv(index, dtype=str, keep_default_na=False)
    return {image_id: raw / path for image_id, path in zip(table["id"], table["path"], strict=True)}


def thumbnail(preds: ValidPredictions, row: int, paths: dict[str, Path]) -> str:
    img = str(preds.ids[row])
    true, pred = int(preds.labels[row]), int(preds.predicted[row])
    path = paths.get(img)
    uri = thumbnail_data_uri(path) if path is not None else None
    picture = f"<img src='{uri}' alt='{html.escape(img)}'>" if uri else "<div class='noimg'></div>"
    verdict = "ok" if true == pred else "bad"
    names = preds.classes
    caption = (f"{html.escape(img)}<br>true {html.escape(names[true])}, "
               f"<span class='{verdict}'>pred {html.escape(names[pred])}</span> "
               f"p={preds.probs[row, pred]:.2f}, p(true)={preds.probs[row, true]:.2f}")
    return f"<figure>{picture}<figcaption>{caption}</figcaption></figure>"


def views_section(preds: ValidPredictions, paths: dict[str, Path]) -> str:
    parts = [] if paths else [note("Images not found (no data/raw/train_index.csv): captions only.")]
    for name, rows in five_views(preds).items():
        grid = "".join(thumbnail(preds, r, paths) for r in rows) or note("none")
        parts.append(f"<h3>{html.escape(name)}</h3><div class='grid'>{grid}</div>")
    return "".join(parts)


def validation_kind(cfg: Config) -> str:
    """What the validation images are: whole held-out groups, or (without groups) single images."""
    try:
        competition = read_competition(cfg.paths.path("raw"))
    except StageError:
        return "held out"
    if competition.has_groups:
        return f"whole held-out groups of {competition.group_name}"
    return "held-out images: this competition has no groups, so validation is per image"


def predictions_sections(cfg: Config) -> str:
    preds = find_valid_predictions(cfg)
    if isinstance(preds, str):
        return f"<h2>Validation predictions</h2>{note(preds)}"
    return (f"<h2>Validation predictions: {html.escape(preds.source)}</h2>"
            f"<p>{len(preds.ids)} validation images ({html.escape(validation_kind(cfg))}), from "
            f"data/predictions/{html.escape(preds.source)}/valid.csv.</p>"
            f"<h2>Confusion matrix</h2>{confusion_section(preds)}"
            f"<h2>Per-class log loss</h2>{per_class_section(preds)}"
            f"<h2>Calibration</h2>{calibration_section(preds)}"
            f"<h2>Five views</h2>{views_section(preds, image_paths(cfg))}")


# ---------------------------------------------------------------------------- page


def render_html(metrics: dict[str, dict], profile: str, body: str = "", validation: str = "held out") -> str:
    """The page: stage figures first, then ``body`` (the sections that read other artifacts);
    ``validation`` says what the validation images are (:func:`validation_kind`)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Pipeline report</title>"
            f"<style>{STYLE}</style></head><body><h1>Pipeline report</h1>"
            f"<p>profile: <b>{html.escape(profile)}</b>. Validation images: {html.escape(validation)}; test figures "
            f"exist only where hidden labels do (synthetic data).</p>"
            f"<h2>Log loss per stage</h2>{score_table(metrics)}"
            f"<h2>Ensemble and test-neighbour smoothing</h2>{ensemble_section(metrics)}"
            f"{body}<h2>All figures</h2>{figures_section(metrics)}</body></html>")


def run(cfg: Config) -> dict[str, Any]:
    metrics = collect_metrics(cfg.paths.path("stage_metrics"), cfg.ensemble.members)
    # Not atomic_write_json: it sorts keys, and this map keeps DAG order.
    atomic_write_text(cfg.paths.path("metrics"), json.dumps(metrics, indent=2) + "\n")
    body = (f"<h2>Learning curves</h2>{learning_curves_section(cfg.paths.path('models'))}"
            f"{predictions_sections(cfg)}")
    atomic_write_text(cfg.paths.path("report_html"), render_html(metrics, cfg.profile, body, validation_kind(cfg)))
    return {"stages": list(metrics)}
