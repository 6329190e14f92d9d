"""``report`` stage: collect every stage's figures into ``reports/metrics.json`` (a map of stage name
to figures, DAG order with each per-fold item after its stage, DVC metrics) and render
``reports/report.html``, one static page that opens offline: inline CSS, plots as inline SVG (no
plotting library needed), thumbnails as base64 JPEG.

Sections: cross-validation (each model's out-of-fold log loss beside its hidden-test figures, a step
of the head -> finetune -> pseudo chain that makes CV worse flagged, the ensemble's fallback flagged,
then the log loss per fold); the ensemble (weights, nested against in-sample log loss, smoothing);
calibration (the out-of-fold calibration curve); log loss per stage run (each fold model on its own
held-out fold); learning curves (the Lightning ``metrics.csv`` of every fold model); then, on the best
out-of-fold predictions available (calibrate > ensemble > pseudo > finetune > head): confusion matrix,
per-class log loss, reliability diagram and the course's five views (random correct, random
incorrect, most correct per class, most incorrect per class, most uncertain). Every section says
what it is waiting for when its inputs are absent (the stage can run right after ``sample``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.competition import TRAIN_INDEX, label_indices, read_competition
from pipeline.config import Config, item_stage
from pipeline.errors import StageError
from pipeline.io import atomic_write_text
from pipeline.metrics import KAGGLE_EPS, OOF_FILE, collect_stage_metrics, prediction_classes, read_predictions
from pipeline.registry import PER_FOLD, STAGES

SCORE_KEYS = ("valid_logloss", "valid_acc", "test_logloss", "test_acc")
# Each model of the chain starts from the one before it: a step that raises the CV log loss is flagged.
CHAIN = ("head", "finetune", "pseudo")
PREDICTION_SOURCES = ("calibrate", "ensemble", "pseudo", "finetune", "head")
# Stages whose out-of-fold rows are data/predictions/<stage>/oof.csv; the models' are data/predictions/oof/<model>/.
STAGE_SOURCES = ("calibrate", "ensemble")
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
THUMB_SIZE = (128, 96)
N_RANDOM = 8
N_UNCERTAIN = 8
DASH = "\u2013"
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


def figure(value: object) -> str:
    """A figure for a table cell or a sentence: empty when absent, floats to 4 decimals."""
    return "" if value is None else format_value(value)


def note(text: str) -> str:
    return f"<p class='note'>{html.escape(text)}</p>"


def stage_order(fold_ids: list[int], members: list[int]) -> list[str]:
    """The current DAG in order, each stage followed by its per-fold items: ``head``, ``head@0``,
    ``head@1`` ...; ``member``, ``member@0-0``, ``member@0-1``, ``member@1-0`` ... (member, then fold)."""
    order: list[str] = []
    for stage in STAGES:
        order.append(stage)
        if stage == "member":
            order += [item_stage(stage, m, k) for m in members for k in fold_ids]
        elif stage in PER_FOLD:
            order += [item_stage(stage, k) for k in fold_ids]
    return order


def collect_metrics(folder: Path, fold_ids: list[int], members: list[int]) -> dict[str, dict]:
    """Figures of the stages in the current DAG only: a file left by a stage, fold or member that has
    since been removed from the config is stale and must not reach metrics.json."""
    return collect_stage_metrics(folder, stage_order(fold_ids, members))


def natural_key(text: str) -> list[Any]:
    """``fold10`` after ``fold2``."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text)]


def model_rank(name: str) -> tuple[int, list[Any]]:
    """Sort key of model names: pretrain, the chain (head, finetune, pseudo), member<m> by m, the rest."""
    if name == "pretrain":
        return (0, [])
    if name in CHAIN:
        return (1 + CHAIN.index(name), [])
    if name.startswith("member") and name.removeprefix("member").isdigit():
        return (1 + len(CHAIN), natural_key(name))
    return (2 + len(CHAIN), natural_key(name))


def ordered_models(names: list[str], preferred: list[str] | None = None) -> list[str]:
    """``names`` in ``preferred`` order (the config's candidates), then the others by :func:`model_rank`."""
    first = [name for name in (preferred or []) if name in names]
    return first + sorted((name for name in names if name not in first), key=model_rank)


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
        f"<tr><td>{html.escape(stage)}</td>" + "".join(f"<td>{figure(figs.get(k))}</td>" for k in SCORE_KEYS) + "</tr>"
        for stage, figs in rows
    )
    return (f"<p>One row per stage run: <code>head@k</code>, <code>member@m-k</code> ... is fold k's model scored on "
            f"fold k's held-out rows; ensemble and calibrate on every out-of-fold row (nested).</p>"
            f"<table><tr><th>stage</th>{head}</tr>{body}</table>")


def chain_flags(models: dict[str, dict]) -> dict[str, str]:
    """model -> its predecessor in the head -> finetune -> pseudo chain, for each model whose CV log
    loss is worse than that predecessor's (a chain model left out of the candidates is skipped)."""
    flags: dict[str, str] = {}
    previous: str | None = None
    for name in CHAIN:
        loss = models.get(name, {}).get("valid_logloss")
        if not isinstance(loss, int | float):
            continue
        if previous is not None and loss > models[previous]["valid_logloss"]:
            flags[name] = previous
        previous = name
    return flags


def fold_spread(figs: dict) -> str:
    """Mean ± standard deviation of the fold log losses (a dash with fewer than two folds)."""
    if len(figs.get("folds", {})) < 2 or "fold_logloss_mean" not in figs:
        return DASH
    return f"{figs['fold_logloss_mean']:.4f} ± {figs.get('fold_logloss_std', 0.0):.4f}"


def ensemble_verdict(figs: dict) -> str:
    """The nested ensemble against its best single model: a fallback (flagged), a win, or a tie (the
    weights picked one model only)."""
    best = html.escape(str(figs.get("best_model", "?")))
    if figs.get("fallback"):
        return (f"<b class='bad'>fallback: {html.escape(str(figs['fallback']))}</b> (the nested ensemble did not beat "
                f"its best single model, whose predictions are used)")
    nested, single = figs.get("valid_logloss_before_smoothing"), figs.get("best_model_valid_logloss")
    if not isinstance(nested, int | float) or not isinstance(single, int | float):
        return ""
    if nested < single:
        return f"<span class='ok'>beats {best}</span> ({nested - single:+.4f})"
    alone = any(float(w) == 1.0 for w in figs.get("weights", {}).values())
    return f"ties {best}" + (" (the weights keep that model alone)" if alone else "")


def calibrate_flag(figs: dict) -> str:
    if figs.get("applied"):
        return f"<span class='ok'>applied</span> (temperature {figure(figs.get('temperature'))})"
    return "not applied (it did not lower the nested log loss)"


def cv_section(metrics: dict[str, dict], models: list[str] | None = None) -> str:
    """One row per model (oof.json), then the ensemble and calibrate rows: out-of-fold log loss and
    accuracy, the spread over folds, and the hidden-test figures beside them; then log loss per fold."""
    oof = metrics.get("oof")
    if not oof:
        return note("Waiting for the oof stage (reports/stages/oof.json): it gathers each model's out-of-fold "
                    "predictions and scores them.")
    per_model = oof.get("models", {})
    cv = oof.get("validation", "cv") == "cv"
    est = "CV" if cv else "validation"
    nested = "nested CV" if cv else "nested over validation groups"
    flags = chain_flags(per_model)
    names = ordered_models(list(per_model), models)
    rows: list[tuple[str, dict, str, str]] = []
    for name in names:
        flag = f"<b class='bad'>worse than {html.escape(flags[name])}</b>" if name in flags else ""
        rows.append((name, per_model[name], fold_spread(per_model[name]), flag))
    if metrics.get("ensemble"):
        rows.append((f"ensemble ({nested})", metrics["ensemble"], DASH, ensemble_verdict(metrics["ensemble"])))
    if metrics.get("calibrate"):
        rows.append((f"calibrate ({nested})", metrics["calibrate"], DASH, calibrate_flag(metrics["calibrate"])))
    has_test = any("test_logloss" in figs for _, figs, _, _ in rows)
    columns = ["stage", f"{est} log loss", f"{est} acc", "fold log loss mean ± std"]
    columns += ["hidden test log loss", "hidden test acc", f"test − {est}"] if has_test else []
    body = []
    for label, figs, spread, flag in rows:
        cells = [html.escape(label), figure(figs.get("valid_logloss")), figure(figs.get("valid_acc")), spread]
        if has_test:
            gap = (figs["test_logloss"] - figs["valid_logloss"]
                   if "test_logloss" in figs and "valid_logloss" in figs else None)
            cells += [figure(figs.get("test_logloss")), figure(figs.get("test_acc")), "" if gap is None else f"{gap:+.4f}"]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in [*cells, flag]) + "</tr>")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in [*columns, "flag"])
    intro = (f"<p>Out-of-fold (OOF) predictions of {figure(oof.get('n_oof', '?'))} labelled images over "
             f"{figure(oof.get('n_folds', '?'))} fold(s): every image is predicted by the fold model that never trained "
             f"on it, so the {est} log loss covers all of them at once. The ensemble and calibrate rows are nested: each "
             f"fold combined or calibrated by a fit on the other folds. A step of the head → finetune → pseudo chain "
             f"that raises the {est} log loss is flagged.</p>")
    if not has_test:
        intro += note(f"No hidden test labels (real competition data): the {est} log loss is the estimate of what "
                      "Kaggle will score.")
    return f"{intro}<table><tr>{head}</tr>{''.join(body)}</table>{fold_table(per_model, names)}"


def fold_table(per_model: dict[str, dict], names: list[str]) -> str:
    """Rows: models; columns: folds; cells: the fold's log loss (the lowest of each fold in bold)."""
    folds = sorted({str(f) for name in names for f in per_model[name].get("folds", {})}, key=natural_key)
    if not folds:
        return ""
    size: dict[str, Any] = {}
    for name in names:
        for fold, figs in per_model[name].get("folds", {}).items():
            size.setdefault(str(fold), figs.get("n"))
    losses = {name: {str(f): v.get("logloss") for f, v in per_model[name].get("folds", {}).items()} for name in names}
    best = {f: min((losses[n][f] for n in names if isinstance(losses[n].get(f), int | float)), default=None) for f in folds}
    head = "".join(f"<th>fold {html.escape(f)}" + (f" (n = {size[f]})" if size.get(f) is not None else "") + "</th>"
                   for f in folds)
    body = ""
    for name in names:
        cells = ""
        for f in folds:
            value = losses[name].get(f)
            text = figure(value)
            cells += f"<td><b>{text}</b></td>" if value is not None and value == best[f] else f"<td>{text}</td>"
        body += f"<tr><td>{html.escape(name)}</td>{cells}</tr>"
    return f"<h3>Log loss per fold</h3><table><tr><th>model</th>{head}</tr>{body}</table>"


def ensemble_section(metrics: dict[str, dict], candidates: list[str] | None = None) -> str:
    """Weights per model (with each nested fit's), method, nested against in-sample log loss, the best
    single model and any fallback, the smoothing decision with the log loss by k. ``candidates``: the
    config's candidate order (``ensemble.models()``), the order models are listed in."""
    figs = metrics.get("ensemble")
    if not figs:
        return note("Waiting for the ensemble stage (reports/stages/ensemble.json).")
    weights = figs.get("weights", {})
    singles = figs.get("candidates", {})
    names = ordered_models(list(dict.fromkeys([*weights, *singles])), candidates)
    by_fold = [w for w in figs.get("weights_by_fold") or [] if isinstance(w, dict)]  # one {model: weight} per nested fit
    fold_weights = {name: [float(w.get(name, 0.0)) for w in by_fold] for name in names} if by_fold else {}
    method = {"hill_climb": "hill-climbing ensemble selection (Caruana et al. 2004; a weight is how often a model was "
                            "picked)", "equal": "equal weights"}.get(figs.get("weights_method"),
                                                                     str(figs.get("weights_method", "?")))
    lines = [f"{html.escape(str(figs.get('mean', '?')))} mean of {len(names)} candidates, {html.escape(method)}.",
             f"Out-of-fold log loss before smoothing: nested <b>{figure(figs.get('valid_logloss_before_smoothing'))}</b> "
             f"(each fold combined with weights fitted on the other folds: the honest estimate) against in-sample "
             f"{figure(figs.get('valid_logloss_insample'))} (weights fitted and scored on the same rows: optimistic).",
             f"Best single model {html.escape(str(figs.get('best_model', '?')))}, CV log loss "
             f"{figure(figs.get('best_model_valid_logloss'))}; the ensemble: {ensemble_verdict(figs)}."]
    header = ["model", "weight"] + (["weight per nested fit"] if fold_weights else [])
    header += ["CV log loss", "CV acc"] + (["test log loss", "test acc"] if any("test_logloss" in s for s in singles.values()) else [])
    rows = ""
    for name in names:
        single = singles.get(name, {})
        cells = [html.escape(name), figure(float(weights.get(name, 0.0)))]
        if fold_weights:
            cells.append(", ".join(f"{w:.2f}" for w in fold_weights.get(name, [])))
        cells += [figure(single.get("valid_logloss")), figure(single.get("valid_acc"))]
        if "test log loss" in header:
            cells += [figure(single.get("test_logloss")), figure(single.get("test_acc"))]
        rows += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    table = f"<table><tr>{''.join(f'<th>{h}</th>' for h in header)}</tr>{rows}</table>" if rows else ""
    return "".join(f"<p>{line}</p>" for line in lines) + table + smoothing_section(figs)


def smoothing_section(figs: dict) -> str:
    by_k = [(int(k), float(loss)) for k, loss in figs.get("smoothing_valid_logloss_by_k") or []]
    if not by_k:
        return "<p>Test-neighbour smoothing is off (ensemble.neighbours = 0).</p>"
    k = int(figs.get("smoothing_k") or 0)
    verdict = (f"<b class='ok'>applied</b> with k = {k}" if figs.get("smoothing_applied") and k
               else "<b class='bad'>not applied</b> (no k lowered the out-of-fold log loss)")
    text = (f"<p>Test-neighbour smoothing (k chosen among 1 to {max(k_ for k_, _ in by_k)} on out-of-fold log loss, each "
            f"fold's rows smoothed among that fold's images): {verdict}; out-of-fold log loss "
            f"{figure(figs.get('valid_logloss_before_smoothing'))} before, {figure(figs.get('valid_logloss'))} after.")
    if "test_logloss_before_smoothing" in figs:
        text += (f" Hidden test log loss {figure(figs['test_logloss_before_smoothing'])} before, "
                 f"{figure(figs.get('test_logloss'))} after.")
    rows = f"<tr><td>0 (none)</td><td>{figure(figs.get('valid_logloss_before_smoothing'))}</td></tr>"
    rows += "".join(f"<tr><td>{k_}{' (chosen)' if k_ == k else ''}</td><td>{loss:.4f}</td></tr>" for k_, loss in by_k)
    return f"{text}</p><table><tr><th>k</th><th>out-of-fold log loss</th></tr>{rows}</table>"


def reliability_chart(conf: list[float], acc: list[float], count: list[int], title: str) -> str:
    """A reliability diagram (accuracy against mean confidence per bin) with its expected calibration error."""
    ece = float(sum(n * abs(a - c) for c, a, n in zip(conf, acc, count, strict=True)) / max(sum(count), 1))
    chart = line_chart({"accuracy": (conf, acc)}, title, "confidence (top-class probability)", "accuracy",
                       diagonal=True, limits=(0.0, 1.0, 0.0, 1.0))
    counts = ", ".join(f"{c:.2f}: {n}" for c, n in zip(conf, count, strict=True))
    return (f"{chart}<p>Expected calibration error {ece:.4f}. Points under the diagonal are over-confident "
            f"(images per bin, by mean confidence: {html.escape(counts)}).</p>")


def calibrate_section(metrics: dict[str, dict]) -> str:
    """The calibration fitted on out-of-fold rows, its nested verdict and the OOF calibration curve."""
    figs = metrics.get("calibrate")
    if not figs:
        return note("Waiting for the calibrate stage (reports/stages/calibrate.json).")
    nested = figs.get("valid_logloss_nested")
    verdict = ("<b class='ok'>applied</b> to the test predictions" if figs.get("applied")
               else "<b class='bad'>not applied</b> (the nested log loss did not beat no calibration)")
    text = (f"<p>Fitted on every out-of-fold row: temperature {figure(figs.get('fitted_temperature'))}, clip "
            f"[{figure(figs.get('fitted_clip_lo'))}, {figure(figs.get('fitted_clip_hi'))}]. Out-of-fold log loss "
            f"{figure(figs.get('valid_logloss_before'))} before; "
            + (f"nested {figure(nested)} (each fold calibrated by a fit on the other folds)"
               if nested is not None else "no nested estimate (a single group)")
            + f", in-sample {figure(figs.get('valid_logloss_insample'))} (optimistic): {verdict}.")
    if "test_logloss" in figs:
        text += (f" Hidden test log loss {figure(figs.get('test_logloss_before'))} before, "
                 f"{figure(figs.get('test_logloss'))} after.")
    text += "</p>"
    curve = figs.get("curve") or []
    if not curve:
        return text + note("No calibration curve in calibrate.json.")
    conf = [float(p["confidence"]) for p in curve]
    acc = [float(p["accuracy"]) for p in curve]
    count = [int(p["n"]) for p in curve]
    return text + reliability_chart(conf, acc, count, "out-of-fold calibration curve (calibrate)")


def figures_section(metrics: dict[str, dict]) -> str:
    parts = []
    for stage, figs in metrics.items():
        items = "".join(f"<tr><td>{html.escape(k)}</td><td>{format_value(v)}</td></tr>" for k, v in figs.items())
        parts.append(f"<h3>{html.escape(stage)}</h3><table>{items}</table>")
    return "".join(parts) or note("No stage has written figures yet.")


# ---------------------------------------------------------------------------- learning curves

LOG_PATTERNS = ("pretrain/logs/metrics.csv", "*/fold*/logs/metrics.csv", "*/fold*/iteration_*/logs/metrics.csv")


def training_logs(models_dir: Path) -> dict[str, list[tuple[str, Path]]]:
    """model -> [(run, Lightning metrics.csv)]: pretrain's log, each fold model's (run ``fold<k>``),
    pseudo's per fold and iteration (``fold<k> iteration_<i>``); models and runs in natural order."""
    found: dict[str, list[tuple[str, Path]]] = {}
    if not models_dir.is_dir():
        return found
    for pattern in LOG_PATTERNS:
        for path in models_dir.glob(pattern):
            parts = path.relative_to(models_dir).parts  # model, [fold<k>, [iteration_<i>]], logs, metrics.csv
            found.setdefault(parts[0], []).append((" ".join(parts[1:-2]) or parts[0], path))
    return {model: sorted(found[model], key=lambda run: natural_key(run[0])) for model in sorted(found, key=model_rank)}


def curve_series(log: pd.DataFrame, columns: list[str]) -> dict[str, tuple[list[float], list[float]]]:
    """Per-epoch series of ``columns`` from a Lightning CSV log (one row per logging call, NaN elsewhere)."""
    if "epoch" not in log.columns:
        return {}
    series = {}
    for column in columns:
        points = log[["epoch", column]].dropna().groupby("epoch")[column].last()
        if len(points):
            series[column] = (points.index.astype(float).tolist(), points.astype(float).tolist())
    return series


def loss_columns(columns: list[str], validated: bool) -> list[str]:
    """Training losses, and validation losses where the run validated on held-out rows of its own."""
    return [c for c in columns if "loss" in c and (validated or c.startswith("train/"))]


def lr_columns(columns: list[str]) -> list[str]:
    return [c for c in columns if c.rsplit("/", 1)[-1].startswith("lr")]


def learning_curves_section(models_dir: Path, cv: bool = True) -> str:
    """Per model, a loss chart and a learning-rate chart with one line per fold (and pseudo iteration).
    In cv mode a fold model never validates on rows of its own, so only training loss is drawn
    (pretrain validates on its own domain's holdout drivers and keeps its curve)."""
    charts = []
    for model, runs in training_logs(models_dir).items():
        validated = model == "pretrain" or not cv
        losses: dict[str, tuple[list[float], list[float]]] = {}
        rates: dict[str, tuple[list[float], list[float]]] = {}
        for run, path in runs:
            try:
                log = pd.read_csv(path)
            except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError):
                continue
            columns = [str(c) for c in log.columns]
            prefix = "" if run == model else f"{run} "
            losses |= {f"{prefix}{c}": s for c, s in curve_series(log, loss_columns(columns, validated)).items()}
            lr = curve_series(log, lr_columns(columns))
            rates |= {run if len(lr) == 1 else f"{run} {c}": s for c, s in lr.items()}
        if losses:
            charts.append(line_chart(losses, f"{model}: loss", "epoch", "loss"))
        if rates:
            charts.append(line_chart(rates, f"{model}: learning rate", "epoch", "lr"))
    if not charts:
        return note("No training logs yet (Lightning metrics.csv under models/<model>/fold<k>/logs/).")
    intro = ("<p>Training loss and learning rate per epoch, one line per fold: in cross-validation a fold model never "
             "validates on its own held-out rows (they are predicted once, afterwards), so its held-out log loss is in "
             "the Cross-validation section, not here.</p>" if cv else
             "<p>Training and validation loss per epoch (validation: the held-out split), and the learning rate.</p>")
    return f"{intro}<div class='charts'>{''.join(charts)}</div>"


# ---------------------------------------------------------------------------- out-of-fold predictions


@dataclass
class OOFPredictions:
    source: str
    path: Path
    ids: np.ndarray
    probs: np.ndarray
    labels: np.ndarray
    classes: list[str]

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def prediction_files(cfg: Config) -> list[tuple[str, Path]]:
    """(source, out-of-fold file), best first: calibrate and ensemble under data/predictions/<stage>/,
    the models gathered by the oof stage under data/predictions/oof/<model>/."""
    return [(source, cfg.paths.path("predictions") / source / OOF_FILE if source in STAGE_SOURCES
             else cfg.paths.oof_predictions(source) / OOF_FILE) for source in PREDICTION_SOURCES]


def find_oof_predictions(cfg: Config) -> OOFPredictions | str:
    """The best final out-of-fold predictions with their labels (split.csv), or why there are none."""
    split_csv = cfg.paths.path("split_csv")
    for source, path in prediction_files(cfg):
        if not path.exists():
            continue
        if not split_csv.exists():
            return f"{path} exists but {split_csv} does not: labels unknown."
        ids, probs = read_predictions(path)  # skips the fold column
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
        return OOFPredictions(source, path, ids_arr, probs, labels, classes)
    looked = ", ".join(str(relative(cfg, path)) for _, path in prediction_files(cfg))
    return f"No out-of-fold predictions yet (looked for {looked})."


def relative(cfg: Config, path: Path) -> Path:
    try:
        return path.relative_to(cfg.paths.root)
    except ValueError:
        return path


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def confusion_section(preds: OOFPredictions) -> str:
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


def per_class_section(preds: OOFPredictions) -> str:
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


def calibration_section(preds: OOFPredictions) -> str:
    conf, acc, count, _ = reliability(preds.probs, preds.labels)
    return reliability_chart(conf, acc, count, "reliability diagram")


# ---------------------------------------------------------------------------- the five views


def five_views(preds: OOFPredictions, seed: int = 0) -> dict[str, list[int]]:
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


def thumbnail(preds: OOFPredictions, row: int, paths: dict[str, Path]) -> str:
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


def views_section(preds: OOFPredictions, paths: dict[str, Path]) -> str:
    parts = [] if paths else [note("Images not found (no data/raw/train_index.csv): captions only.")]
    for name, rows in five_views(preds).items():
        grid = "".join(thumbnail(preds, r, paths) for r in rows) or note("none")
        parts.append(f"<h3>{html.escape(name)}</h3><div class='grid'>{grid}</div>")
    return "".join(parts)


def validation_kind(cfg: Config) -> str:
    """What validates the models: K-fold cross-validation (grouped, or over images without groups), or
    one held-out split (whole groups, or single images)."""
    try:
        competition = read_competition(cfg.paths.path("raw"))
    except StageError:
        competition = None
    if cfg.split.validation == "cv":
        kind = f"{len(cfg.split.fold_ids)}-fold cross-validation"
        if competition is None:
            return kind
        if competition.has_groups:
            return f"{kind} grouped by {competition.group_name}"
        return f"{kind} over images (this competition has no groups)"
    if competition is None:
        return "held out"
    if competition.has_groups:
        return f"whole held-out groups of {competition.group_name}"
    return "held-out images: this competition has no groups, so validation is per image"


def predictions_sections(cfg: Config) -> str:
    preds = find_oof_predictions(cfg)
    if isinstance(preds, str):
        return f"<h2>Out-of-fold predictions</h2>{note(preds)}"
    return (f"<h2>Out-of-fold predictions: {html.escape(preds.source)}</h2>"
            f"<p>{len(preds.ids)} labelled images, each predicted by a model that never trained on it "
            f"({html.escape(validation_kind(cfg))}), from {html.escape(str(relative(cfg, preds.path)))}.</p>"
            f"<h2>Confusion matrix</h2>{confusion_section(preds)}"
            f"<h2>Per-class log loss</h2>{per_class_section(preds)}"
            f"<h2>Reliability of {html.escape(preds.source)}</h2>{calibration_section(preds)}"
            f"<h2>Five views</h2>{views_section(preds, image_paths(cfg))}")


# ---------------------------------------------------------------------------- page


def render_html(metrics: dict[str, dict], profile: str, body: str = "", validation: str = "held out",
                models: list[str] | None = None) -> str:
    """The page: stage figures first, then ``body`` (the sections that read other artifacts);
    ``validation`` says what validates the models (:func:`validation_kind`); ``models`` is the
    config's candidate order (``ensemble.models()``)."""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Pipeline report</title>"
            f"<style>{STYLE}</style></head><body><h1>Pipeline report</h1>"
            f"<p>profile: <b>{html.escape(profile)}</b>. Validation: {html.escape(validation)}. Out-of-fold figures "
            f"score every labelled image by a model that never trained on it; test figures exist only where hidden "
            f"labels do (synthetic data).</p>"
            f"<h2>Cross-validation</h2>{cv_section(metrics, models)}"
            f"<h2>Ensemble and test-neighbour smoothing</h2>{ensemble_section(metrics, models)}"
            f"<h2>Calibration</h2>{calibrate_section(metrics)}"
            f"<h2>Log loss per stage run</h2>{score_table(metrics)}"
            f"{body}<h2>All figures</h2>{figures_section(metrics)}</body></html>")


def run(cfg: Config) -> dict[str, Any]:
    metrics = collect_metrics(cfg.paths.path("stage_metrics"), cfg.split.fold_ids, cfg.ensemble.members)
    # Not atomic_write_json: it sorts keys, and this map keeps DAG order.
    atomic_write_text(cfg.paths.path("metrics"), json.dumps(metrics, indent=2) + "\n")
    cv = cfg.split.validation == "cv"
    body = (f"<h2>Learning curves</h2>{learning_curves_section(cfg.paths.path('models'), cv)}"
            f"{predictions_sections(cfg)}")
    atomic_write_text(cfg.paths.path("report_html"),
                      render_html(metrics, cfg.profile, body, validation_kind(cfg), cfg.ensemble.models()))
    return {"stages": list(metrics)}
