"""The report as data: one typed record per thing the page shows (score rows with their flags, the
submission's estimate, verdicts, fold tables, the five views, timings, the run), built from the stages'
figures and the out-of-fold predictions by plain functions. No markup here: ``render`` lays it out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.config import Config
from pipeline.ensembling.estimate import METHODS
from pipeline.metrics import chain_steps, expected_calibration_error, reliability_bins
from pipeline.registry import model_rank
from pipeline.report.collect import Revision, git_revision, read_competition_or_none, validation_kind
from pipeline.report.plots import (
    Series,
    learning_rates,
    legend_label,
    loss_columns,
    natural_key,
    rate_lines,
    read_log,
    series,
    training_logs,
)
from pipeline.report.predictions import (
    OOFPredictions,
    breakdown,
    confusion_matrix,
    five_views,
    image_paths,
    relative,
    thumbnail_data_uri,
)

SCORE_KEYS = ("valid_logloss", "valid_acc", "test_logloss", "test_acc")
MAX_GROUPS = 40  # a bar per group up to this many; beyond it the worst ones
WEIGHT_METHODS = {"hill_climb": "hill-climbing ensemble selection (Caruana et al. 2004; a weight is how often a model "
                                "was picked)", "equal": "equal weights"}


def figure(value: object) -> str:
    """A figure in a cell or a sentence: empty when absent, floats to 4 decimals."""
    return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------------------- charts (drawn by render)


@dataclass(frozen=True)
class BarChart:
    labels: list[str]
    values: list[float]
    title: str
    xlabel: str
    counts: list[int] | None = None
    reference: float | None = None  # a dashed line: the overall figure to compare each bar with
    unit: str = "{:.3f}"


@dataclass(frozen=True)
class LearningChart:
    model: str
    losses: dict[str, Series]
    rates: dict[str, Series]
    rate_x: str


@dataclass(frozen=True)
class ConfusionChart:
    matrix: np.ndarray
    classes: list[str]
    title: str


@dataclass(frozen=True)
class ReliabilityChart:
    confidence: list[float]
    accuracy: list[float]
    count: list[int]
    title: str

    @property
    def ece(self) -> float:
        return expected_calibration_error(self.confidence, self.accuracy, self.count)


# ---------------------------------------------------------------------------- cross-validation


@dataclass(frozen=True)
class Flag:
    """A verdict: ``label`` in the ``tone`` colour (``ok``, ``bad`` or plain), bold when ``strong``, then ``detail``."""

    label: str
    tone: str = ""
    detail: str = ""
    strong: bool = False


@dataclass(frozen=True)
class ScoreRow:
    label: str
    valid_logloss: float | None
    valid_acc: float | None
    test_logloss: float | None = None
    test_acc: float | None = None
    fold_mean: float | None = None  # mean ± std of the fold log losses: models with two folds or more
    fold_std: float | None = None
    flag: Flag | None = None

    @property
    def gap(self) -> float | None:
        """Hidden test less out-of-fold log loss."""
        if self.test_logloss is None or self.valid_logloss is None:
            return None
        return self.test_logloss - self.valid_logloss


@dataclass(frozen=True)
class FoldCell:
    logloss: float | None
    best: bool  # the lowest of its fold


@dataclass(frozen=True)
class FoldTable:
    folds: list[str]
    sizes: list[int | None]
    rows: list[tuple[str, list[FoldCell]]]


@dataclass(frozen=True)
class CrossValidation:
    estimate: str  # "CV", or "validation" in holdout mode
    n_oof: Any
    n_folds: Any
    rows: list[ScoreRow]
    folds: FoldTable | None

    @property
    def has_test(self) -> bool:
        return any(row.test_logloss is not None for row in self.rows)


@dataclass(frozen=True)
class SubmissionEstimate:
    method: str  # calibrate.estimate, as the console names it
    value: float  # the submission's estimated log loss
    low: float | None  # the interval over the test's drivers
    high: float | None
    level: float | None  # the interval's coverage
    gain: float | None  # the label-free log loss gain of averaging the fold models on the test images
    candidates: dict[str, float]  # every candidate estimate, by name


def submission_estimate(calibrate: dict) -> SubmissionEstimate | None:
    """Calibrate's estimate of the submission with its interval and the other candidates; None before
    calibrate wrote one. The one place these keys are read."""
    value = calibrate.get("submission_logloss_estimate")
    method = calibrate.get("submission_estimate_method")
    if not is_number(value) or method not in METHODS:
        return None
    return SubmissionEstimate(METHODS[method], float(value), calibrate.get("submission_logloss_low"),
                              calibrate.get("submission_logloss_high"), calibrate.get("submission_interval_level"),
                              calibrate.get("fold_averaging_gain"),
                              {METHODS[k]: v for k, v in (calibrate.get("submission_estimates") or {}).items() if k in METHODS})


def ordered_models(names: list[str], preferred: list[str] | None = None) -> list[str]:
    """``names`` in ``preferred`` order (the config's candidates), then the others by :func:`model_rank`."""
    first = [name for name in (preferred or []) if name in names]
    return first + sorted((name for name in names if name not in first), key=model_rank)


def chain_flags(models: dict[str, dict]) -> dict[str, str]:
    """model -> its predecessor in the head -> finetune -> pseudo chain, for each model whose CV log
    loss is worse than that predecessor's (``pipeline.metrics.chain_steps``)."""
    return {model: predecessor for predecessor, model, worse in chain_steps(models) if worse}


def ensemble_verdict(figs: dict) -> Flag | None:
    """The nested ensemble against its best single model: a fallback (flagged), a win, or a tie (the
    weights picked one model only)."""
    best = str(figs.get("best_model", "?"))
    if figs.get("fallback"):
        return Flag(f"fallback: {figs['fallback']}", "bad", "(the nested ensemble did not beat its best single model, "
                    "whose predictions are used)", strong=True)
    nested, single = figs.get("valid_logloss_before_smoothing"), figs.get("best_model_valid_logloss")
    if not isinstance(nested, int | float) or not isinstance(single, int | float):
        return None
    if nested < single:
        return Flag(f"beats {best}", "ok", f"({nested - single:+.4f})")
    alone = any(float(w) == 1.0 for w in figs.get("weights", {}).values())
    return Flag(f"ties {best}", detail="(the weights keep that model alone)" if alone else "")


def calibrate_flag(figs: dict) -> Flag:
    if figs.get("applied"):
        return Flag("applied", "ok", f"(temperature {figure(figs.get('temperature'))})")
    return Flag("not applied", detail="(it did not lower the nested log loss)")


def score_row(label: str, figs: dict, flag: Flag | None = None, spread: bool = False) -> ScoreRow:
    two_folds = spread and len(figs.get("folds", {})) >= 2 and "fold_logloss_mean" in figs
    return ScoreRow(label, figs.get("valid_logloss"), figs.get("valid_acc"), figs.get("test_logloss"),
                    figs.get("test_acc"), figs["fold_logloss_mean"] if two_folds else None,
                    figs.get("fold_logloss_std", 0.0) if two_folds else None, flag)


def submission_estimate_row(calibrate: dict) -> ScoreRow | None:
    estimate = submission_estimate(calibrate)
    if estimate is None:
        return None
    interval = (f"{estimate.level:.0%} interval over test drivers [{estimate.low:.4f}, {estimate.high:.4f}]"
                if is_number(estimate.low) and is_number(estimate.high) and is_number(estimate.level) else "")
    return ScoreRow(f"submission estimate ({estimate.method})", estimate.value, None,
                    calibrate.get("test_logloss"), calibrate.get("test_acc"), flag=Flag(interval) if interval else None)


def cross_validation(metrics: dict[str, dict], models: list[str] | None = None) -> CrossValidation | None:
    """One row per model (oof.json), then the ensemble and calibrate rows and the submission's estimate;
    then log loss per fold. None before the oof stage."""
    oof = metrics.get("oof")
    if not oof:
        return None
    per_model = oof.get("models", {})
    cv = oof.get("validation", "cv") == "cv"
    nested = "nested CV" if cv else "nested over validation groups"
    flags = chain_flags(per_model)
    names = ordered_models(list(per_model), models)
    rows = [score_row(name, per_model[name], Flag(f"worse than {flags[name]}", "bad", strong=True)
                      if name in flags else None, spread=True) for name in names]
    if metrics.get("ensemble"):
        rows.append(score_row(f"ensemble ({nested})", metrics["ensemble"], ensemble_verdict(metrics["ensemble"])))
    if metrics.get("calibrate"):
        rows.append(score_row(f"calibrate ({nested})", metrics["calibrate"], calibrate_flag(metrics["calibrate"])))
        if (averaged := submission_estimate_row(metrics["calibrate"])) is not None:
            rows.append(averaged)
    return CrossValidation("CV" if cv else "validation", oof.get("n_oof", "?"), oof.get("n_folds", "?"), rows,
                           fold_table(per_model, names))


def fold_table(per_model: dict[str, dict], names: list[str]) -> FoldTable | None:
    """Rows: models; columns: folds; cells: the fold's log loss, the lowest of each fold marked."""
    folds = sorted({str(f) for name in names for f in per_model[name].get("folds", {})}, key=natural_key)
    if not folds:
        return None
    size: dict[str, Any] = {}
    for name in names:
        for fold, figs in per_model[name].get("folds", {}).items():
            size.setdefault(str(fold), figs.get("n"))
    losses = {name: {str(f): v.get("logloss") for f, v in per_model[name].get("folds", {}).items()} for name in names}
    best = {f: min((losses[n][f] for n in names if isinstance(losses[n].get(f), int | float)), default=None) for f in folds}
    rows = [(name, [FoldCell(losses[name].get(f), losses[name].get(f) is not None and losses[name].get(f) == best[f])
                    for f in folds]) for name in names]
    return FoldTable(folds, [size.get(f) for f in folds], rows)


@dataclass(frozen=True)
class StageRun:
    """A row of the per-stage-run table: ``SCORE_KEYS``' figures, None where absent."""

    stage: str
    figures: list[Any]


def stage_runs(metrics: dict[str, dict]) -> list[StageRun]:
    return [StageRun(stage, [figs.get(k) for k in SCORE_KEYS]) for stage, figs in metrics.items()
            if any(k in figs for k in SCORE_KEYS)]


# ---------------------------------------------------------------------------- ensemble and calibration


@dataclass(frozen=True)
class WeightRow:
    model: str
    weight: float
    fold_weights: list[float] | None  # one per nested fit
    valid_logloss: float | None
    valid_acc: float | None
    test_logloss: float | None
    test_acc: float | None


@dataclass(frozen=True)
class Smoothing:
    by_k: list[tuple[int, float]]  # empty: smoothing is off
    k: int
    applied: bool
    before: float | None
    after: float | None
    test_before: float | None  # None without hidden labels
    test_after: float | None

    @property
    def max_k(self) -> int:
        return max(k for k, _ in self.by_k)


@dataclass(frozen=True)
class Ensemble:
    mean: str
    method: str
    nested: float | None
    insample: float | None
    best_model: str
    best_model_logloss: float | None
    verdict: Flag | None
    rows: list[WeightRow]
    has_fold_weights: bool
    has_test: bool
    smoothing: Smoothing


def ensemble(metrics: dict[str, dict], candidates: list[str] | None = None) -> Ensemble | None:
    """Weights per model (with each nested fit's), method, nested against in-sample log loss, the best
    single model and any fallback, the smoothing decision with the log loss by k. ``candidates``: the
    config's candidate order, the order models are listed in. None before the ensemble stage."""
    figs = metrics.get("ensemble")
    if not figs:
        return None
    weights = figs.get("weights", {})
    singles = figs.get("candidates", {})
    names = ordered_models(list(dict.fromkeys([*weights, *singles])), candidates)
    by_fold = [w for w in figs.get("weights_by_fold") or [] if isinstance(w, dict)]
    rows = [WeightRow(name, float(weights.get(name, 0.0)), [float(w.get(name, 0.0)) for w in by_fold] if by_fold else None,
                      singles.get(name, {}).get("valid_logloss"), singles.get(name, {}).get("valid_acc"),
                      singles.get(name, {}).get("test_logloss"), singles.get(name, {}).get("test_acc"))
            for name in names]
    method = WEIGHT_METHODS.get(figs.get("weights_method"), str(figs.get("weights_method", "?")))
    by_k = [(int(k), float(loss)) for k, loss in figs.get("smoothing_valid_logloss_by_k") or []]
    k = int(figs.get("smoothing_k") or 0)
    smoothing = Smoothing(by_k, k, bool(figs.get("smoothing_applied") and k), figs.get("valid_logloss_before_smoothing"),
                          figs.get("valid_logloss"), figs.get("test_logloss_before_smoothing"), figs.get("test_logloss"))
    return Ensemble(str(figs.get("mean", "?")), method, figs.get("valid_logloss_before_smoothing"),
                    figs.get("valid_logloss_insample"), str(figs.get("best_model", "?")),
                    figs.get("best_model_valid_logloss"), ensemble_verdict(figs), rows, bool(by_fold),
                    any("test_logloss" in s for s in singles.values()), smoothing)


@dataclass(frozen=True)
class CalibrateVerdict:
    """The calibration fitted on every out-of-fold row and its nested verdict."""

    temperature: float | None
    clip_lo: float | None
    clip_hi: float | None
    before: float | None
    nested: float | None  # None: a single group, no nested estimate
    insample: float | None
    applied: bool
    submission: SubmissionEstimate | None
    test_before: float | None
    test_after: float | None  # None without hidden labels


@dataclass(frozen=True)
class Calibration:
    verdict: CalibrateVerdict | None  # None before the calibrate stage
    curve: ReliabilityChart | None  # of the best out-of-fold predictions, else calibrate.json's


def calibration(metrics: dict[str, dict], preds: OOFPredictions | str) -> Calibration:
    figs = metrics.get("calibrate")
    verdict = None if not figs else CalibrateVerdict(
        figs.get("fitted_temperature"), figs.get("fitted_clip_lo"), figs.get("fitted_clip_hi"),
        figs.get("valid_logloss_before"), figs.get("valid_logloss_nested"), figs.get("valid_logloss_insample"),
        bool(figs.get("applied")), submission_estimate(figs),
        figs.get("test_logloss_before"), figs.get("test_logloss") if "test_logloss" in figs else None)
    if isinstance(preds, OOFPredictions):
        conf, acc, count = reliability_bins(preds.probs, preds.labels)
        return Calibration(verdict, ReliabilityChart(conf, acc, count, f"Calibration curve: {preds.source}, out-of-fold"))
    curve = (figs or {}).get("curve") or []
    if not curve:
        return Calibration(verdict, None)
    return Calibration(verdict, ReliabilityChart([float(p["confidence"]) for p in curve], [float(p["accuracy"]) for p in curve],
                                                 [int(p["n"]) for p in curve], "Calibration curve: calibrate, out-of-fold"))


# ---------------------------------------------------------------------------- learning curves and timings


def learning_charts(models_dir: Path, cv: bool = True) -> list[LearningChart]:
    """Per model, its loss by epoch beside its learning rate, one line per fold (and pseudo iteration).
    In cv mode a fold model never validates on rows of its own, so only training loss is drawn
    (pretrain validates on its own domain's holdout drivers and keeps its curve)."""
    charts = []
    for model, runs in training_logs(models_dir).items():
        validated = model == "pretrain" or not cv
        losses: dict[str, Series] = {}
        rates: dict[str, dict[str, Series]] = {}
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
            charts.append(LearningChart(model, losses, rate_lines(rates), "optimizer step" if rate_x == "step" else "epoch"))
    return charts


def timings(metrics: dict[str, dict]) -> BarChart | None:
    """Seconds per stage run (each stage's figures carry ``seconds``), in DAG order."""
    timed = [(stage, float(figs["seconds"])) for stage, figs in metrics.items() if is_number(figs.get("seconds"))]
    if not timed:
        return None
    total = sum(seconds for _, seconds in timed)
    return BarChart([s for s, _ in timed], [t for _, t in timed], f"Seconds per stage run (sum {total / 60:.1f} min)",
                    "seconds", unit="{:.1f} s")


# ---------------------------------------------------------------------------- out-of-fold predictions


@dataclass(frozen=True)
class Thumbnail:
    id: str
    true: str
    predicted: str
    p_predicted: float
    p_true: float
    uri: str | None  # a base64 JPEG; None when the image is not found

    @property
    def correct(self) -> bool:
        return self.true == self.predicted


@dataclass(frozen=True)
class Predictions:
    source: str
    n_images: int
    validation: str
    path: str
    group: str  # the competition's group name, "group" without groups
    confusion: ConfusionChart
    per_class: BarChart
    per_group: BarChart | None  # None: the competition has no groups
    views: dict[str, list[Thumbnail]]
    images_found: bool


def thumbnail(preds: OOFPredictions, row: int, paths: dict[str, Path]) -> Thumbnail:
    img = str(preds.ids[row])
    true, pred = int(preds.labels[row]), int(preds.predicted[row])
    path = paths.get(img)
    return Thumbnail(img, preds.classes[true], preds.classes[pred], float(preds.probs[row, pred]),
                     float(preds.probs[row, true]), thumbnail_data_uri(path) if path is not None else None)


def predictions(cfg: Config, preds: OOFPredictions) -> Predictions:
    """Confusion matrix, log loss per class and per group, the five views."""
    competition = read_competition_or_none(cfg)
    has_groups = competition.has_groups if competition is not None else preds.groups is not None
    group_name = competition.group_name if competition is not None else "group"
    split = breakdown(preds, has_groups)
    per_class = BarChart(split.per_class.index.tolist(), split.per_class["mean"].tolist(), "Log loss per true class",
                         "log loss", split.per_class["count"].tolist(), split.overall)
    per_group = None
    if split.per_group is not None:
        shown = split.per_group.head(MAX_GROUPS)
        title = f"Log loss per {group_name}" + (
            f" (worst {MAX_GROUPS} of {len(split.per_group)})" if len(split.per_group) > len(shown) else "")
        per_group = BarChart([str(g) for g in shown.index], shown["mean"].tolist(), title, "log loss",
                             shown["count"].tolist(), split.overall)
    matrix = confusion_matrix(preds.labels, preds.predicted, len(preds.classes))
    paths = image_paths(cfg)
    return Predictions(
        preds.source, len(preds.ids), validation_kind(cfg, competition), str(relative(cfg, preds.path)),
        competition.group_name if competition is not None and competition.has_groups else "group",
        ConfusionChart(matrix, list(preds.classes), f"Confusion matrix: {preds.source}, out-of-fold"),
        per_class, per_group, {name: [thumbnail(preds, r, paths) for r in rows] for name, rows in five_views(preds).items()},
        bool(paths))


# ---------------------------------------------------------------------------- the page


@dataclass(frozen=True)
class Submission:
    kind: str  # "code" (a code competition's notebook) or "file"
    dry_run: bool
    kernel: str | None = None
    kernel_version: Any = None


def submission(submit: dict[str, Any]) -> Submission | None:
    """Which kind of submission the submit stage made, and whether it was a dry run."""
    if not submit:
        return None
    code = submit.get("kind") == "code"
    return Submission("code" if code else "file", bool(submit.get("dry_run")), submit.get("kernel") if code else None,
                      submit.get("kernel_version") if code else None)


@dataclass(frozen=True)
class Report:
    profile: str
    validation: str
    revision: Revision
    submission: Submission | None
    cross_validation: CrossValidation | None
    learning: list[LearningChart]
    cv: bool
    ensemble: Ensemble | None
    calibration: Calibration
    predictions: Predictions | str  # a string: what the out-of-fold sections wait for
    timings: BarChart | None
    stage_runs: list[StageRun]
    params: str  # params.yaml of this run
    figures: dict[str, dict] = field(default_factory=dict)  # every stage's raw figures


def build_report(cfg: Config, metrics: dict[str, dict], preds: OOFPredictions | str) -> Report:
    """The page: scores first, then training, the final stages, the out-of-fold views, and the raw
    material (timings, per stage run, config, figures) last."""
    cv = cfg.split.validation == "cv"
    models = cfg.ensemble.models()
    return Report(
        cfg.profile, validation_kind(cfg, read_competition_or_none(cfg)),
        git_revision(cfg.paths.root, cfg.paths.reports.rstrip("/") + "/"), submission(metrics.get("submit", {})),
        cross_validation(metrics, models), learning_charts(cfg.paths.path("models"), cv), cv,
        ensemble(metrics, models), calibration(metrics, preds),
        predictions(cfg, preds) if isinstance(preds, OOFPredictions) else preds,
        timings(metrics), stage_runs(metrics), yaml.safe_dump(cfg.to_params(), sort_keys=False), metrics)
