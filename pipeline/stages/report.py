"""``report`` stage: what a Kaggler looks at after a run, in three forms.

- ``reports/metrics.json``: every stage's figures (stage name -> figures, DAG order with each per-fold
  item after its stage). The Prefect flows read it; DVC treats it as a plain output.
- ``reports/scores/<model>.json``: the compact DVC metrics, one small file per model (head, finetune,
  pseudo, member<m>, ensemble, calibrate) with its CV (or validation) log loss, the spread over folds,
  accuracy, and the hidden-test figures where hidden labels exist. DVC draws one row per file and one
  column per key, so ``dvc metrics show`` is a model-by-score table that fits a terminal.
- ``reports/plots/``: the data of DVC's ``plots:`` (``dvc plots show/diff``): training loss and
  learning rate per model (mean over folds), the confusion rows and the calibration bins of the best
  out-of-fold predictions.
- ``reports/report.html``: one static page that opens offline (inline CSS, charts as inline SVG drawn by
  matplotlib, thumbnails as base64 JPEG): cross-validation table (each model's out-of-fold log loss
  beside its hidden-test figures, a chain step that makes CV worse flagged, the fold-averaged
  submission's estimate), learning curves with the
  learning rate, ensemble and calibration verdicts, then on the best out-of-fold predictions
  (calibrate > ensemble > pseudo > finetune > head): calibration curve with bin counts, confusion
  matrix, log loss per class and per group, the five views of fast.ai's Practical Deep Learning for
  Coders, part 1 (2017), lesson 2 (random correct, random incorrect, most correct per class, most
  incorrect per class, most uncertain); stage timings, the
  run's config and git revision, and every raw figure (collapsed).

Every section says what it is waiting for when its inputs are absent (the stage can run right after
``sample``). No file written here holds a non-finite number.
"""

from __future__ import annotations

import base64
import html
import io
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from pipeline.competition import TRAIN_INDEX, Competition, label_indices, read_competition
from pipeline.config import MODELS, Config, item_stage
from pipeline.errors import StageError
from pipeline.io import atomic_dir, atomic_write_csv, atomic_write_json, atomic_write_text, remove_leftovers
from pipeline.metrics import (
    OOF_FILE,
    chain_steps,
    collect_stage_metrics,
    expected_calibration_error,
    normalise,
    prediction_classes,
    read_predictions,
    reliability_bins,
    require_finite,
    row_logloss,
)
from pipeline.plots import (
    bar_chart,
    calibration_table,
    confusion_chart,
    confusion_rows,
    learning_curves_chart,
    learning_rates,
    learning_tables,
    legend_label,
    loss_columns,
    natural_key,
    rate_lines,
    read_log,
    reliability_chart,
    series,
    timings_chart,
    training_logs,
)
from pipeline.registry import PER_FOLD, STAGES, model_rank

SCORE_KEYS = ("valid_logloss", "valid_acc", "test_logloss", "test_acc")
# The stages after the models, in DAG order: their out-of-fold rows are data/predictions/<stage>/oof.csv
# (the models' are data/predictions/oof/<model>/), their rows of reports/scores/ follow the models' (oof.json).
FINAL_STAGES = ("ensemble", "calibrate")
# Whose out-of-fold predictions the report shows: the latest stage that has them.
PREDICTION_SOURCES = (*reversed(FINAL_STAGES), *reversed(MODELS))
THUMB_SIZE = (128, 96)
N_RANDOM = 8
N_UNCERTAIN = 8
MAX_GROUPS = 40  # a bar per group up to this many; beyond it the worst ones
DASH = "\u2013"
STYLE = (
    "*{box-sizing:border-box}body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0 auto;"
    "padding:1em 2em 3em;max-width:90em;color:#222;line-height:1.4}"
    "h1{margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}h3{margin:1.2em 0 .4em}"
    "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
    "th{background:#f3f3f3}td{font-variant-numeric:tabular-nums;white-space:nowrap}td:last-child{white-space:normal}"
    ".meta{color:#444}.meta code{background:#f3f3f3;padding:0 .3em}nav{margin:.6em 0 0;font-size:.95em;display:flex;flex-wrap:wrap;gap:.3em 1.2em}"
    ".note{color:#666;font-style:italic}.grid{display:flex;flex-wrap:wrap;gap:.5em}"
    "figure{margin:0;width:132px;font-size:11px}figure img,.noimg{width:128px;height:96px;display:block;background:#eee}"
    ".ok{color:#2a7d2a}.bad{color:#b22}"
    ".charts{display:flex;flex-wrap:wrap;gap:1.5em;align-items:flex-start}svg.chart{max-width:100%;height:auto}"
    ".side{flex:1 1 22em;max-width:40em}.figures{display:flex;flex-wrap:wrap;gap:0 2em}.figures details{min-width:12em}"
    "details{margin:.6em 0}summary{cursor:pointer;color:#245}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;"
    "font-size:12px;max-height:40em}"
)
SECTIONS = (  # (anchor, title) in page order: the table of contents
    ("cv", "Cross-validation"), ("learning", "Learning curves"), ("ensemble", "Ensemble and test-neighbour smoothing"),
    ("calibration", "Calibration"), ("oof", "Out-of-fold predictions"), ("confusion", "Confusion matrix"),
    ("breakdown", "Log loss per class and per group"), ("views", "Five views"), ("timings", "Stage timings"),
    ("runs", "Log loss per stage run"), ("run", "Run: revision and config"), ("figures", "All figures"),
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


def heading(anchor: str, title: str | None = None) -> str:
    """An ``<h2>`` the table of contents links to."""
    return f"<h2 id='{anchor}'>{html.escape(title or dict(SECTIONS)[anchor])}</h2>"


def collapsed(summary: str, body: str) -> str:
    return f"<details><summary>{html.escape(summary)}</summary>{body}</details>"


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


def ordered_models(names: list[str], preferred: list[str] | None = None) -> list[str]:
    """``names`` in ``preferred`` order (the config's candidates), then the others by :func:`model_rank`."""
    first = [name for name in (preferred or []) if name in names]
    return first + sorted((name for name in names if name not in first), key=model_rank)


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
    loss is worse than that predecessor's (``pipeline.metrics.chain_steps``)."""
    return {model: predecessor for predecessor, model, worse in chain_steps(models) if worse}


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


def submission_estimate_row(figs: dict) -> tuple[str, dict, str, str] | None:
    """The submission averages the K fold models; each OOF row saw one: the CV log loss less the
    label-free gain of that averaging is the estimate of the submission (None when nothing is averaged)."""
    gain = figs.get("fold_averaging_gain")
    if gain is None or figs.get("submission_logloss_estimate") is None:
        return None
    row = {"valid_logloss": figs["submission_logloss_estimate"]} | {k: figs[k] for k in ("test_logloss", "test_acc") if k in figs}
    return ("submission estimate (CV − fold averaging gain)", row, DASH,
            f"averaging the fold models gains {gain:.4f} on test (label-free)")


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
        if (averaged := submission_estimate_row(metrics["calibrate"])) is not None:
            rows.append(averaged)
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


def calibrate_verdict(metrics: dict[str, dict]) -> str:
    """The calibration fitted on out-of-fold rows and its nested verdict, or what it waits for."""
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
    if figs.get("fold_averaging_gain") is not None:
        text += (f" The submission averages the fold models, each OOF row saw one: averaging gains "
                 f"{figure(figs['fold_averaging_gain'])} on the test images (label-free), so the submission's estimate "
                 f"is {figure(figs.get('submission_logloss_estimate'))}.")
    if "test_logloss" in figs:
        text += (f" Hidden test log loss {figure(figs.get('test_logloss_before'))} before, "
                 f"{figure(figs.get('test_logloss'))} after.")
    return text + "</p>"


def calibration_curve(conf: list[float], acc: list[float], count: list[int], title: str) -> str:
    """The reliability chart, and beside it the expected calibration error and the bins as a table."""
    ece = expected_calibration_error(conf, acc, count)
    rows = "".join(f"<tr><td>{c:.3f}</td><td>{a:.3f}</td><td>{n}</td></tr>" for c, a, n in zip(conf, acc, count, strict=True))
    table = f"<table><tr><th>mean confidence</th><th>accuracy</th><th>images</th></tr>{rows}</table>"
    text = (f"<p>Expected calibration error <b>{ece:.4f}</b> (the count-weighted gap between accuracy and "
            f"confidence). Points under the diagonal are over-confident: the log loss punishes those most. A bin "
            f"holding a handful of images says little.</p>")
    return f"<div class='charts'>{reliability_chart(conf, acc, count, title)}<div class='side'>{text}{table}</div></div>"


def calibration_section(metrics: dict[str, dict], preds: OOFPredictions | str) -> str:
    """The calibrate stage's verdict, then the calibration curve of the best out-of-fold predictions
    (else the curve calibrate.json keeps)."""
    text = calibrate_verdict(metrics)
    if isinstance(preds, OOFPredictions):
        conf, acc, count = reliability_bins(preds.probs, preds.labels)
        return text + calibration_curve(conf, acc, count, f"Calibration curve: {preds.source}, out-of-fold")
    curve = (metrics.get("calibrate") or {}).get("curve") or []
    if not curve:
        return text + (note("No calibration curve in calibrate.json.") if metrics.get("calibrate") else "")
    conf = [float(p["confidence"]) for p in curve]
    acc = [float(p["accuracy"]) for p in curve]
    count = [int(p["n"]) for p in curve]
    return text + calibration_curve(conf, acc, count, "Calibration curve: calibrate, out-of-fold")


def figures_section(metrics: dict[str, dict]) -> str:
    """Every stage's raw figures, one collapsed table per stage run."""
    parts = []
    for stage, figs in metrics.items():
        items = "".join(f"<tr><td>{html.escape(k)}</td><td>{format_value(v)}</td></tr>" for k, v in figs.items())
        parts.append(collapsed(stage, f"<table>{items}</table>"))
    if not parts:
        return note("No stage has written figures yet.")
    return collapsed(f"Raw figures of {len(parts)} stage runs (reports/metrics.json)", f"<div class='figures'>{''.join(parts)}</div>")


def timings_section(metrics: dict[str, dict]) -> str:
    """Seconds per stage run (each stage's figures carry ``seconds``), in DAG order."""
    timed = [(stage, float(figs["seconds"])) for stage, figs in metrics.items()
             if isinstance(figs.get("seconds"), int | float) and not isinstance(figs.get("seconds"), bool)]
    if not timed:
        return note("No stage has reported its time yet (each stage's figures carry seconds).")
    total = sum(seconds for _, seconds in timed)
    title = f"Seconds per stage run (sum {total / 60:.1f} min)"
    return (f"<p>Time of each stage run as the stage measured it, without the process start-up (imports); fold "
            f"stages that ran on separate workers overlap.</p>"
            f"<div class='charts'>{timings_chart([s for s, _ in timed], [t for _, t in timed], title)}</div>")


# ---------------------------------------------------------------------------- learning curves


def learning_curves_section(models_dir: Path, cv: bool = True) -> str:
    """Per model, its loss by epoch beside its learning rate, one line per fold (and pseudo iteration).
    In cv mode a fold model never validates on rows of its own, so only training loss is drawn
    (pretrain validates on its own domain's holdout drivers and keeps its curve)."""
    charts = []
    for model, runs in training_logs(models_dir).items():
        validated = model == "pretrain" or not cv
        losses: dict[str, tuple[list[float], list[float]]] = {}
        rates: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
        rate_x = "epoch"
        for run, path in runs:
            log = read_log(path)
            if log is None:
                continue
            columns = loss_columns(list(log.columns), validated)
            losses |= {legend_label(run, model, c, len(columns) > 1): s for c, s in series(log, "epoch", columns).items()}
            x, found = learning_rates(log)
            if found:
                rates[run], rate_x = found, x
        if losses or rates:
            charts.append(learning_curves_chart(model, losses, rate_lines(rates),
                                                "optimizer step" if rate_x == "step" else "epoch"))
    if not charts:
        return note("No training logs yet (Lightning metrics.csv under models/<model>/fold<k>/logs/).")
    intro = ("<p>Training loss per epoch and the learning rate, one line per fold: in cross-validation a fold model "
             "never validates on its own held-out rows (they are predicted once, afterwards), so its held-out log loss "
             "is in the Cross-validation section, not here.</p>" if cv else
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
    groups: np.ndarray | None = None  # split.csv's group of each row, where the competition has groups

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def prediction_files(cfg: Config) -> list[tuple[str, Path]]:
    """(source, out-of-fold file), best first: calibrate and ensemble under data/predictions/<stage>/,
    the models gathered by the oof stage under data/predictions/oof/<model>/."""
    return [(source, cfg.paths.path("predictions") / source / OOF_FILE if source in FINAL_STAGES
             else cfg.paths.oof_predictions(source) / OOF_FILE) for source in PREDICTION_SOURCES]


def find_oof_predictions(cfg: Config) -> OOFPredictions | str:
    """The best final out-of-fold predictions with their labels and groups (split.csv), or why there are none."""
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
        probs = normalise(probs[known])
        groups = split.set_index("id").loc[ids_arr, "group"].to_numpy() if "group" in split.columns else None
        return OOFPredictions(source, path, ids_arr, probs, labels, classes, groups)
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
    """The matrix as a chart (class names on both axes), and its counts as a collapsed table."""
    classes = preds.classes
    matrix = confusion_matrix(preds.labels, preds.predicted, len(classes))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in classes)
    rows = "".join(f"<tr><th>{html.escape(c)}</th>" + "".join(f"<td>{n}</td>" for n in matrix[i]) + "</tr>"
                   for i, c in enumerate(classes))
    table = (f"<p>Rows: true class; columns: predicted.</p>"
             f"<table class='cm'><tr><th></th>{head}</tr>{rows}</table>")
    chart = confusion_chart(matrix, classes, f"Confusion matrix: {preds.source}, out-of-fold")
    return (f"<p>{len(preds.ids)} images; a cell's colour is its share of the true class (row), its number the "
            f"image count.</p><div class='charts'>{chart}</div>{collapsed('Counts as a table', table)}")


def mean_by(losses: np.ndarray, keys: np.ndarray) -> pd.DataFrame:
    """Mean log loss and image count per key, in first-seen key order."""
    frame = pd.DataFrame({"key": keys, "loss": losses})
    return frame.groupby("key", sort=False)["loss"].agg(["mean", "count"])


def breakdown_section(preds: OOFPredictions, competition: Competition | None) -> str:
    """Log loss per true class (class order) and per group (worst first): where the score is lost."""
    losses = row_logloss(preds.probs, preds.labels)
    overall = float(losses.mean())
    names = np.asarray(preds.classes, dtype=object)[preds.labels]
    per_class = mean_by(losses, names).reindex([c for c in preds.classes if c in set(names)])
    charts = [bar_chart(per_class.index.tolist(), per_class["mean"].tolist(), "Log loss per true class", "log loss",
                        counts=per_class["count"].tolist(), reference=overall)]
    group_name = competition.group_name if competition is not None else "group"
    has_groups = competition.has_groups if competition is not None else preds.groups is not None
    text = ""
    if has_groups and preds.groups is not None:
        per_group = mean_by(losses, preds.groups).sort_values("mean", ascending=False)
        shown = per_group.head(MAX_GROUPS)
        title = f"Log loss per {group_name}" + (f" (worst {MAX_GROUPS} of {len(per_group)})" if len(per_group) > len(shown) else "")
        charts.append(bar_chart([str(g) for g in shown.index], shown["mean"].tolist(), title, "log loss",
                                counts=shown["count"].tolist(), reference=overall))
        text = (f"<p>Per {html.escape(group_name)}: the folds hold whole {html.escape(group_name)}s out, as the test "
                f"set does, so a {html.escape(group_name)} far above the line is one the models do not generalise to.</p>")
    else:
        text = note("This competition has no groups: no per-group breakdown.")
    return f"{text}<div class='charts'>{''.join(charts)}</div>"


# ---------------------------------------------------------------------------- the five views


def five_views(preds: OOFPredictions, seed: int = 0) -> dict[str, list[int]]:
    """Row numbers for the five views (the module docstring names their source). "Per class" is per
    predicted class, as in that lesson's notebook (most correct c: predicted c and right, highest p(c); most incorrect c: predicted c and
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


def read_competition_or_none(cfg: Config) -> Competition | None:
    try:
        return read_competition(cfg.paths.path("raw"))
    except StageError:
        return None


def validation_kind(cfg: Config) -> str:
    """What validates the models: K-fold cross-validation (grouped, or over images without groups), or
    one held-out split (whole groups, or single images)."""
    competition = read_competition_or_none(cfg)
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


def predictions_sections(cfg: Config, preds: OOFPredictions | str) -> str:
    """Out-of-fold predictions, confusion matrix, per class and group, five views: each waits for the
    predictions with the same sentence when there are none."""
    if isinstance(preds, str):
        return "".join(heading(anchor) + note(preds) for anchor in ("oof", "confusion", "breakdown", "views"))
    competition = read_competition_or_none(cfg)
    group = competition.group_name if competition is not None and competition.has_groups else "group"
    return (f"{heading('oof', f'Out-of-fold predictions: {preds.source}')}"
            f"<p>{len(preds.ids)} labelled images, each predicted by a model that never trained on it "
            f"({html.escape(validation_kind(cfg))}), from {html.escape(str(relative(cfg, preds.path)))}.</p>"
            f"{heading('confusion')}{confusion_section(preds)}"
            f"{heading('breakdown', f'Log loss per class and per {group}')}{breakdown_section(preds, competition)}"
            f"{heading('views')}{views_section(preds, image_paths(cfg))}")


# ---------------------------------------------------------------------------- DVC views


def scores(metrics: dict[str, dict], cv: bool) -> dict[str, dict[str, float]]:
    """model (and ensemble, calibrate) -> its compact DVC metrics: ``cv_logloss``, ``cv_logloss_std``
    (over folds, models only), ``cv_acc`` (``valid_*`` in holdout mode), ``test_logloss``,
    ``test_acc`` where hidden labels exist, and calibrate's ``submission_estimate`` in cv mode."""
    est = "cv" if cv else "valid"
    rows = dict((metrics.get("oof") or {}).get("models", {}))
    rows |= {stage: metrics[stage] for stage in FINAL_STAGES if metrics.get(stage)}
    table = {}
    for name, figs in rows.items():
        spread = figs.get("fold_logloss_std") if len(figs.get("folds", {})) >= 2 else None
        picked = {f"{est}_logloss": figs.get("valid_logloss"), f"{est}_logloss_std": spread,
                  f"{est}_acc": figs.get("valid_acc"), "test_logloss": figs.get("test_logloss"),
                  "test_acc": figs.get("test_acc")}
        if figs.get("fold_averaging_gain") is not None:  # calibrate: the fold-averaged submission's estimate
            picked["submission_estimate"] = figs.get("submission_logloss_estimate")
        table[name] = {k: float(v) for k, v in picked.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return table


def write_scores(folder: Path, table: dict[str, dict[str, float]]) -> None:
    """One JSON per row (DVC shows a row per file), swapped in whole so a removed model leaves no file."""
    remove_leftovers(folder.parent, folder.name)  # of a run killed while writing
    with atomic_dir(folder) as tmp:
        for name, figs in table.items():
            require_finite(np.array([list(figs.values())]), "a score", folder / f"{name}.json", list(figs))
            atomic_write_json(tmp / f"{name}.json", figs)


def write_plot_data(folder: Path, models_dir: Path, preds: OOFPredictions | str) -> None:
    """What dvc.yaml's ``plots:`` read: learning/<model>.csv (epoch, train_loss), learning_rate/<model>.csv
    (step, lr), confusion.csv (actual, predicted) and calibration.csv (bins) of the best OOF predictions."""
    losses, rates = learning_tables(training_logs(models_dir))
    remove_leftovers(folder.parent, folder.name)
    with atomic_dir(folder) as tmp:
        for sub, tables in (("learning", losses), ("learning_rate", rates)):
            for name, table in tables.items():
                atomic_write_csv(tmp / sub / f"{name}.csv", table, float_format="%.6g")
        if isinstance(preds, OOFPredictions):
            atomic_write_csv(tmp / "confusion.csv", confusion_rows(preds.labels, preds.predicted, preds.classes))
            atomic_write_csv(tmp / "calibration.csv", calibration_table(*reliability_bins(preds.probs, preds.labels)))


# ---------------------------------------------------------------------------- the run


def git_revision(root: Path, outputs: str = "reports/") -> str:
    """The checkout's commit and the tracked files changed since (``dvc exp run -S`` edits params.yaml),
    outside ``outputs`` (the figures files the stages rewrite); a sentence, never an error: the stage
    also runs outside git."""
    def git(*args: str) -> str | None:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=False)
        return done.stdout if done.returncode == 0 else None

    try:
        sha = (git("rev-parse", "--short", "HEAD") or "").strip()
        changed = git("status", "--porcelain", "--untracked-files=no") if sha else None
    except (OSError, subprocess.SubprocessError):
        return "unknown (git is not available)"
    if not sha:
        return "none (not a git checkout, or no commit yet)"
    files = [line[3:] for line in (changed or "").splitlines() if line.strip() and not line[3:].startswith(outputs)]
    if not files:
        return f"<code>{html.escape(sha)}</code>"
    shown = ", ".join(html.escape(f) for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    return f"<code>{html.escape(sha)}</code> with uncommitted changes to {shown}"


def run_section(cfg: Config, revision: str) -> str:
    params = yaml.safe_dump(cfg.to_params(), sort_keys=False)
    return (f"<p>Git revision: {revision}. Profile <b>{html.escape(cfg.profile)}</b>.</p>"
            + collapsed("Config of this run (params.yaml)", f"<pre>{html.escape(params)}</pre>"))


def submission_line(submit: dict[str, Any]) -> str:
    """Which kind of submission the submit stage made (a CSV upload, or a code competition's notebook,
    linked to its version on Kaggle) and whether it was a dry run."""
    if not submit:
        return ""
    if submit.get("kind") == "code":
        kernel = submit.get("kernel")
        what = "a code competition's notebook" + (
            f" (<a href='https://www.kaggle.com/code/{html.escape(kernel)}'>{html.escape(kernel)}</a>, version "
            f"{html.escape(str(submit.get('kernel_version')))})" if kernel else "")
    else:
        what = "the file submissions/submission.csv"
    return f"Submission: {what}{', dry run: nothing uploaded' if submit.get('dry_run') else ', uploaded'}."


def render_html(cfg: Config, metrics: dict[str, dict], preds: OOFPredictions | str) -> str:
    """The page: scores first, then training, the final stages, the out-of-fold views, and the raw
    material (timings, per stage run, config, figures) last."""
    cv = cfg.split.validation == "cv"
    models = cfg.ensemble.models()
    revision = git_revision(cfg.paths.root, cfg.paths.reports.rstrip("/") + "/")
    nav = "".join(f"<a href='#{anchor}'>{html.escape(title)}</a>" for anchor, title in SECTIONS)
    return (f"<!doctype html><html><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>Pipeline report</title>"
            f"<style>{STYLE}</style></head><body><h1>Pipeline report</h1>"
            f"<p class='meta'>profile: <b>{html.escape(cfg.profile)}</b>. Validation: {html.escape(validation_kind(cfg))}. "
            f"Revision: {revision}. Out-of-fold figures score every labelled image by a model that "
            f"never trained on it; test figures exist only where hidden labels do (synthetic data). "
            f"{submission_line(metrics.get('submit', {}))}</p><nav>{nav}</nav>"
            f"{heading('cv')}{cv_section(metrics, models)}"
            f"{heading('learning')}{learning_curves_section(cfg.paths.path('models'), cv)}"
            f"{heading('ensemble')}{ensemble_section(metrics, models)}"
            f"{heading('calibration')}{calibration_section(metrics, preds)}"
            f"{predictions_sections(cfg, preds)}"
            f"{heading('timings')}{timings_section(metrics)}"
            f"{heading('runs')}{score_table(metrics)}"
            f"{heading('run')}{run_section(cfg, revision)}"
            f"{heading('figures')}{figures_section(metrics)}</body></html>")


def run(cfg: Config) -> dict[str, Any]:
    metrics = collect_metrics(cfg.paths.path("stage_metrics"), cfg.split.fold_ids, cfg.ensemble.members)
    # Not atomic_write_json: it sorts keys, and this map keeps DAG order.
    atomic_write_text(cfg.paths.path("metrics"), json.dumps(metrics, indent=2) + "\n")
    table = scores(metrics, cfg.split.validation == "cv")
    write_scores(cfg.paths.path("scores"), table)
    preds = find_oof_predictions(cfg)
    write_plot_data(cfg.paths.path("plots"), cfg.paths.path("models"), preds)
    atomic_write_text(cfg.paths.path("report_html"), render_html(cfg, metrics, preds))
    return {"stages": list(metrics), "scores": sorted(table)}
