"""The report stage and pipeline/report/: metrics.json and DVC's files, the typed view of the page
(rows, flags, numbers), and a few checks of the rendered HTML itself."""

import json
import re
import subprocess

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.competition import Competition, write_competition
from pipeline.config import MODELS, load_profile
from pipeline.errors import BadInputError, StageError
from pipeline.metrics import write_predictions, write_stage_metrics
from pipeline.report import collect, plots, predictions, render
from pipeline.report.collect import Revision, collect_metrics
from pipeline.report.predictions import OOFPredictions, find_oof_predictions
from pipeline.report.view import Flag, ScoreRow, StageRun, Submission, build_report, chain_flags, submission
from pipeline.stages.report import run
from pipeline.synthetic.drivers import CLASSES


def page_of(cfg) -> str:
    run(cfg)
    return cfg.paths.path("report_html").read_text()


def view_of(cfg):
    """The page's view model, from the stage files and predictions under ``cfg``'s paths."""
    metrics = collect_metrics(cfg.paths.path("stage_metrics"), cfg.split.fold_ids, cfg.ensemble.members)
    return build_report(cfg, metrics, find_oof_predictions(cfg))


def stage_json(cfg, name, figures):
    write_stage_metrics(cfg.paths.stage_metrics_file(name), figures)


def section(page: str, title: str) -> str:
    """The HTML between ``<h2 id=...>title</h2>`` and the next ``<h2``."""
    parts = re.split(rf"<h2[^>]*>{re.escape(title)}</h2>", page, maxsplit=1)
    assert len(parts) == 2, f"no section {title!r}"
    return parts[1].split("<h2", 1)[0]


def rows_by_label(cv) -> dict[str, ScoreRow]:
    return {row.label: row for row in cv.rows}


def chart_titles(html: str) -> list[str]:
    """The title of each inline SVG chart (matplotlib's, labelled by plots.to_svg)."""
    return re.findall(r"<svg class='chart' role='img' aria-label='([^']*)'", html)


def svg_texts(html: str) -> set[str]:
    """Every text drawn in the charts: titles, axis labels, ticks, legend entries."""
    return set(re.findall(r"<text[^>]*>([^<]*)</text>", html))


def drawn(spec) -> set[str]:
    """The texts of a view's chart as the page draws it."""
    return svg_texts(str(render.chart(spec)))


# ---------------------------------------------------------------------------- metrics.json


def test_report_collects_stage_figures_in_dag_order(smoke_cfg):
    stage_json(smoke_cfg, "split", {"n_valid": 3})
    stage_json(smoke_cfg, "ingest", {"n_train": 9})
    page = page_of(smoke_cfg)
    metrics = json.loads(smoke_cfg.paths.path("metrics").read_text())
    assert list(metrics) == ["ingest", "split"]
    assert metrics["split"] == {"n_valid": 3}
    assert list(view_of(smoke_cfg).figures) == ["ingest", "split"]
    assert "<summary>ingest</summary>" in page and "n_train" in page


def test_stage_order_puts_every_fold_item_after_its_stage():
    order = collect.stage_order([0, 1, 2], [0, 5])
    for stage in MODELS:  # the chain: one item per fold each
        at = order.index(stage)
        assert order[at:at + 4] == [stage, f"{stage}@0", f"{stage}@1", f"{stage}@2"]
    at = order.index("member")
    assert order[at:at + 8] == ["member", "member@0-0", "member@0-1", "member@0-2", "member@5-0", "member@5-1",
                                "member@5-2", "oof"]  # matrix items: member, then fold; oof gathers them
    assert order.index("features") < order.index("head") and order.index("calibrate") < order.index("report")
    assert not any(name.startswith(("ingest@", "oof@", "ensemble@")) for name in order)


def test_metrics_follow_the_per_fold_dag_order_and_drop_stale_items(tmp_path, monkeypatch):
    """Written in scrambled order; fold 2 and member 3 are not in the config (stale files)."""
    monkeypatch.setattr(collect, "STAGES", {"head": "", "member": "", "ensemble": ""})
    cfg = load_profile("smoke", {"ensemble.members": [2, 10]}).at(tmp_path)
    assert cfg.split.fold_ids == [0, 1]
    for name in ("ensemble", "member@10-1", "member@2-1", "head@1", "member@10-0", "head@2", "member@3-0", "head@0",
                 "member@2-0", "head"):
        stage_json(cfg, name, {"valid_logloss": 1.0})
    run(cfg)
    metrics = json.loads(cfg.paths.path("metrics").read_text())
    assert list(metrics) == ["head", "head@0", "head@1", "member@2-0", "member@2-1", "member@10-0", "member@10-1",
                             "ensemble"]


def test_holdout_mode_has_one_fold_item_per_stage(tmp_path):
    cfg = load_profile("smoke", {"split.validation": "holdout"}).at(tmp_path)
    for name in ("head@0", "head@1", "member@0-0", "member@0-1"):
        stage_json(cfg, name, {"valid_logloss": 1.0})
    run(cfg)
    assert list(json.loads(cfg.paths.path("metrics").read_text())) == ["head@0", "member@0-0"]


def test_report_table_shows_log_loss_per_stage_run(smoke_cfg):
    stage_json(smoke_cfg, "head@1", {"valid_logloss": 0.51234, "valid_acc": 0.8, "fold": 1})
    stage_json(smoke_cfg, "ingest", {"n_train": 9})  # no score: no row
    assert view_of(smoke_cfg).stage_runs == [StageRun("head@1", [0.51234, 0.8, None, None])]
    page = page_of(smoke_cfg)  # figures to 4 decimals, absent ones empty
    assert "<td>head@1</td><td>0.5123</td><td>0.8000</td><td></td><td></td>" in section(page, "Log loss per stage run")


def test_every_section_degrades_gracefully_without_inputs(smoke_cfg):
    view = view_of(smoke_cfg)
    assert view.cross_validation is None and view.ensemble is None and view.calibration.verdict is None
    assert view.learning == [] and view.timings is None and view.stage_runs == [] and view.figures == {}
    assert view.predictions.startswith("No out-of-fold predictions yet")
    page = page_of(smoke_cfg)
    for text in ("No stage has produced predictions yet", "Waiting for the oof stage", "Waiting for the ensemble stage",
                 "Waiting for the calibrate stage", "No training logs yet", "No out-of-fold predictions yet",
                 "No stage has written figures yet", "No stage has reported its time yet"):
        assert text in page
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
    # DVC's views exist (empty) so the stage's outputs are whole right after `sample`
    assert list(smoke_cfg.paths.path("scores").iterdir()) == []
    assert smoke_cfg.paths.path("plots").is_dir()


# ---------------------------------------------------------------------------- cross-validation


def fold_figures(losses, n=(40, 40)):
    folds = {str(k): {"logloss": loss, "acc": 0.5, "n": size} for k, (loss, size) in enumerate(zip(losses, n, strict=True))}
    mean = float(np.mean(losses))
    return {"folds": folds, "fold_logloss_mean": mean, "fold_logloss_std": float(np.std(losses, ddof=1))}


def oof_json(cfg, cv_losses: dict[str, float], test: bool = True, validation: str = "cv"):
    """oof.json with one entry per model, CV log loss as given; fold losses CV -/+ 0.1."""
    models = {}
    for name, loss in cv_losses.items():
        models[name] = {"valid_logloss": loss, "valid_acc": 0.8, **fold_figures([loss - 0.1, loss + 0.1])}
        if test:
            models[name] |= {"test_logloss": loss + 0.1, "test_acc": 0.7}
    best = min(cv_losses, key=cv_losses.get)
    stage_json(cfg, "oof", {"validation": validation, "n_folds": 2, "n_oof": 80, "models": models, "best_model": best,
                            "best_valid_logloss": cv_losses[best], "seconds": 0.1})


def ensemble_json(cfg, **overrides):
    figures = {
        "valid_logloss": 0.35, "valid_acc": 0.85, "test_logloss": 0.45, "test_acc": 0.75, "validation": "cv",
        "valid_logloss_insample": 0.31, "valid_logloss_before_smoothing": 0.38, "test_logloss_before_smoothing": 0.47,
        "weights_method": "hill_climb", "mean": "arithmetic",
        "weights": {"finetune": 0.6, "head": 0.1, "member0": 0.3},  # sorted keys, as atomic_write_json writes them
        "weights_by_fold": [{"head": 0.2, "finetune": 0.5, "member0": 0.3}, {"head": 0.0, "finetune": 0.7, "member0": 0.3}],
        "fallback": None, "best_model": "finetune", "best_model_valid_logloss": 0.4, "beats_best_model": True,
        "smoothing_k": 2, "smoothing_applied": True, "smoothing_valid_logloss_by_k": [[1, 0.37], [2, 0.35], [3, 0.36]],
        "candidates": {m: {"valid_logloss": v, "valid_acc": 0.8, "test_logloss": v + 0.1, "test_acc": 0.7}
                       for m, v in (("finetune", 0.4), ("head", 0.5), ("member0", 0.45))},
    }
    stage_json(cfg, "ensemble", figures | overrides)


def calibrate_json(cfg, **overrides):
    figures = {"valid_logloss": 0.33, "valid_acc": 0.85, "valid_logloss_before": 0.35, "valid_logloss_nested": 0.33,
               "valid_logloss_insample": 0.32, "applied": True, "temperature": 1.3, "clip_lo": 0.001, "clip_hi": 0.99,
               "fitted_temperature": 1.3, "fitted_clip_lo": 0.001, "fitted_clip_hi": 0.99,
               "curve": [{"confidence": 0.45, "accuracy": 0.35, "n": 30}, {"confidence": 0.85, "accuracy": 0.75, "n": 50}],
               "test_logloss": 0.44, "test_acc": 0.75, "test_logloss_before": 0.45, "test_acc_before": 0.75}
    stage_json(cfg, "calibrate", figures | overrides)


def test_cv_table_shows_hidden_test_beside_cv_for_each_model_and_stage(smoke_cfg):
    oof_json(smoke_cfg, {"member0": 0.45, "pseudo": 0.42, "head": 0.5, "finetune": 0.4})
    ensemble_json(smoke_cfg)
    calibrate_json(smoke_cfg)
    cv = view_of(smoke_cfg).cross_validation
    assert cv.estimate == "CV" and cv.has_test and (cv.n_oof, cv.n_folds) == (80, 2)
    assert [row.label for row in cv.rows] == ["head", "finetune", "pseudo", "member0", "ensemble (nested CV)",
                                              "calibrate (nested CV)"]
    rows = rows_by_label(cv)
    # CV, accuracy, fold mean ± std (losses 0.4 and 0.6), then hidden test beside it and the gap
    head = rows["head"]
    assert (head.valid_logloss, head.valid_acc, head.test_logloss, head.test_acc) == (0.5, 0.8, 0.6, 0.7)
    assert head.fold_mean == pytest.approx(0.5) and head.fold_std == pytest.approx(0.1414214)
    assert head.gap == pytest.approx(0.1)
    ensemble = rows["ensemble (nested CV)"]
    assert (ensemble.valid_logloss, ensemble.valid_acc, ensemble.fold_mean, ensemble.test_logloss) == (0.35, 0.85, None, 0.45)
    assert ensemble.gap == pytest.approx(0.1)
    calibrated = rows["calibrate (nested CV)"]
    assert (calibrated.valid_logloss, calibrated.valid_acc, calibrated.fold_mean, calibrated.test_logloss,
            calibrated.test_acc) == (0.33, 0.85, None, 0.44, 0.75)
    assert calibrated.flag == Flag("applied", "ok", "(temperature 1.3000)")


ESTIMATES = {"submission_estimate_method": "cv", "submission_logloss_estimate": 0.33, "submission_logloss_low": 0.28,
             "submission_logloss_high": 0.41, "submission_interval_level": 0.8,
             "submission_estimates": {"cv": 0.33, "cv_less_gain": 0.29, "cv_less_half_gain": 0.31, "cv_plus_shift": 0.34}}


def test_cv_table_and_scores_give_the_submissions_estimate_with_its_interval_and_every_candidate(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4})
    ensemble_json(smoke_cfg)
    calibrate_json(smoke_cfg, fold_averaging_gain=0.04, **ESTIMATES)
    view = view_of(smoke_cfg)
    row = view.cross_validation.rows[-1]
    assert row.label == "submission estimate (the CV log loss)"
    assert (row.valid_logloss, row.valid_acc, row.test_logloss, row.test_acc) == (0.33, None, 0.44, 0.75)
    assert row.flag.label == "80% interval over test drivers [0.2800, 0.4100]"
    estimate = view.calibration.verdict.submission
    assert (estimate.value, estimate.low, estimate.high, estimate.gain) == (0.33, 0.28, 0.41, 0.04)
    assert estimate.candidates == {"the CV log loss": 0.33, "CV less the fold averaging gain": 0.29,
                                   "CV less half the fold averaging gain": 0.31, "CV plus the test confidence shift": 0.34}
    assert read_scores(smoke_cfg)["calibrate"]["submission_estimate"] == 0.33
    page = smoke_cfg.paths.path("report_html").read_text()
    assert "CV less the fold averaging gain 0.2900" in page and "[0.2800, 0.4100]" in page


def test_a_calibrate_json_without_an_estimate_shows_none(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4})
    calibrate_json(smoke_cfg, fold_averaging_gain=None)
    view = view_of(smoke_cfg)
    assert not any(r.label.startswith("submission estimate") for r in view.cross_validation.rows)
    assert view.calibration.verdict.submission is None
    assert "submission_estimate" not in read_scores(smoke_cfg)["calibrate"]


def test_cv_table_without_hidden_labels_has_no_test_columns(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4}, test=False)
    cv = view_of(smoke_cfg).cross_validation
    assert not cv.has_test
    finetune = rows_by_label(cv)["finetune"]
    assert (finetune.valid_logloss, finetune.valid_acc, finetune.test_logloss, finetune.gap, finetune.flag) == \
        (0.4, 0.8, None, None, None)
    assert finetune.fold_mean == pytest.approx(0.4) and finetune.fold_std == pytest.approx(0.1414214)
    page = section(page_of(smoke_cfg), "Cross-validation")
    assert "hidden test log loss" not in page and "No hidden test labels" in page


def test_a_chain_step_worse_than_its_predecessor_is_flagged(smoke_cfg):
    """finetune is worse than head; pseudo beats finetune (its predecessor) though not head; a member
    is never compared with the chain."""
    oof_json(smoke_cfg, {"head": 0.4, "finetune": 0.5, "pseudo": 0.45, "member0": 0.9})
    flags = {row.label: row.flag for row in view_of(smoke_cfg).cross_validation.rows}
    assert flags == {"head": None, "finetune": Flag("worse than head", "bad", strong=True), "pseudo": None, "member0": None}
    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4, "pseudo": 0.41})
    flags = {row.label: row.flag for row in view_of(smoke_cfg).cross_validation.rows}
    assert flags == {"head": None, "finetune": None, "pseudo": Flag("worse than finetune", "bad", strong=True)}


def test_chain_flags_compare_with_the_nearest_model_present():
    assert chain_flags({"head": {"valid_logloss": 0.4}, "pseudo": {"valid_logloss": 0.5}}) == {"pseudo": "head"}
    assert chain_flags({"head": {"valid_logloss": 0.4}, "finetune": {"valid_logloss": 0.4}}) == {}  # a tie is no worse
    assert chain_flags({"finetune": {"valid_logloss": 0.4}, "member0": {"valid_logloss": 0.1}}) == {}


def test_an_ensemble_fallback_is_flagged(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4})
    ensemble_json(smoke_cfg, fallback="finetune", beats_best_model=False, valid_logloss=0.4,
                  valid_logloss_before_smoothing=0.4, weights={"finetune": 1.0, "head": 0.0, "member0": 0.0})
    view = view_of(smoke_cfg)
    fallback = Flag("fallback: finetune", "bad", "(the nested ensemble did not beat its best single model, whose "
                    "predictions are used)", strong=True)
    assert rows_by_label(view.cross_validation)["ensemble (nested CV)"].flag == fallback
    assert view.ensemble.verdict == fallback


def test_an_ensemble_that_beats_its_best_model_is_not_flagged(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4})
    ensemble_json(smoke_cfg)
    assert rows_by_label(view_of(smoke_cfg).cross_validation)["ensemble (nested CV)"].flag == \
        Flag("beats finetune", "ok", "(-0.0200)")


def test_an_ensemble_that_keeps_one_model_ties_it(smoke_cfg):
    ensemble_json(smoke_cfg, valid_logloss_before_smoothing=0.4, weights={"finetune": 1.0, "head": 0.0, "member0": 0.0})
    assert view_of(smoke_cfg).ensemble.verdict == Flag("ties finetune", detail="(the weights keep that model alone)")


def test_per_fold_table_has_a_column_per_fold_and_a_row_per_model(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4})
    folds = view_of(smoke_cfg).cross_validation.folds
    assert folds.folds == ["0", "1"] and folds.sizes == [40, 40]
    table = {name: [(cell.logloss, cell.best) for cell in cells] for name, cells in folds.rows}
    assert table["head"] == [(pytest.approx(0.4), False), (pytest.approx(0.6), False)]
    assert table["finetune"] == [(pytest.approx(0.3), True), (pytest.approx(0.5), True)]  # the best of each fold


def test_holdout_mode_says_validation_not_cv(tmp_path):
    cfg = load_profile("smoke", {"split.validation": "holdout"}).at(tmp_path)
    oof_json(cfg, {"head": 0.5}, validation="holdout")
    assert view_of(cfg).cross_validation.estimate == "validation"
    cv = section(page_of(cfg), "Cross-validation")
    assert "<th>validation log loss</th>" in cv and "CV log loss" not in cv


# ---------------------------------------------------------------------------- ensemble and calibration


def test_ensemble_section_shows_weights_method_nested_and_smoothing(tmp_path):
    cfg = load_profile("smoke", {"ensemble.include": ["head", "finetune"], "ensemble.members": [0]}).at(tmp_path)
    ensemble_json(cfg)
    ens = view_of(cfg).ensemble
    assert ens.method.startswith("hill-climbing ensemble selection") and ens.mean == "arithmetic" and len(ens.rows) == 3
    assert (ens.nested, ens.insample, ens.best_model, ens.best_model_logloss) == (0.38, 0.31, "finetune", 0.4)
    # each nested fit's weights, by model, in the config's candidate order
    rows = {row.model: row for row in ens.rows}
    assert [row.model for row in ens.rows] == ["head", "finetune", "member0"] and ens.has_fold_weights and ens.has_test
    assert (rows["head"].weight, rows["head"].fold_weights, rows["head"].valid_logloss, rows["head"].valid_acc) == \
        (0.1, [0.2, 0.0], 0.5, 0.8)
    assert (rows["finetune"].weight, rows["finetune"].fold_weights) == (0.6, [0.5, 0.7])
    smoothing = ens.smoothing
    assert smoothing.applied and smoothing.k == 2 and smoothing.max_k == 3
    assert smoothing.by_k == [(1, 0.37), (2, 0.35), (3, 0.36)] and (smoothing.before, smoothing.after) == (0.38, 0.35)
    assert (smoothing.test_before, smoothing.test_after) == (0.47, 0.45)
    page = section(page_of(cfg), "Ensemble and test-neighbour smoothing")
    assert "arithmetic mean of 3 candidates" in page and "<b class='ok'>applied</b> with k = 2" in page
    assert "<tr><td>2 (chosen)</td><td>0.3500</td></tr>" in page and "<td>0.20, 0.00</td>" in page


def test_ensemble_section_without_smoothing(smoke_cfg):
    ensemble_json(smoke_cfg, smoothing_k=0, smoothing_applied=False, smoothing_valid_logloss_by_k=[])
    smoothing = view_of(smoke_cfg).ensemble.smoothing
    assert smoothing.by_k == [] and not smoothing.applied
    ens = section(page_of(smoke_cfg), "Ensemble and test-neighbour smoothing")
    assert "Test-neighbour smoothing is off" in ens and "(chosen)" not in ens


def test_calibration_section_draws_the_oof_curve(smoke_cfg):
    calibrate_json(smoke_cfg, applied=False, temperature=1.0)
    cal = view_of(smoke_cfg).calibration
    assert cal.curve.title == "Calibration curve: calibrate, out-of-fold"
    assert cal.curve.ece == pytest.approx(0.1)  # (30 * 0.10 + 50 * 0.10) / 80
    verdict = cal.verdict
    assert not verdict.applied and (verdict.nested, verdict.insample, verdict.before) == (0.33, 0.32, 0.35)
    assert (verdict.test_before, verdict.test_after) == (0.45, 0.44)
    # the bins with their image counts, beside the chart
    assert (cal.curve.confidence, cal.curve.accuracy, cal.curve.count) == ([0.45, 0.85], [0.35, 0.75], [30, 50])
    page = section(page_of(smoke_cfg), "Calibration")
    assert chart_titles(page) == ["Calibration curve: calibrate, out-of-fold"]
    assert "Expected calibration error <b>0.1000</b>" in page and "<b class='bad'>not applied</b>" in page
    assert "<tr><td>0.450</td><td>0.350</td><td>30</td></tr>" in page


def test_calibration_without_a_nested_estimate_or_a_curve(smoke_cfg):
    calibrate_json(smoke_cfg, valid_logloss_nested=None, curve=[])
    cal = view_of(smoke_cfg).calibration
    assert cal.verdict.nested is None and cal.curve is None
    page = section(page_of(smoke_cfg), "Calibration")
    assert "no nested estimate (a single group)" in page and "No calibration curve in calibrate.json." in page


# ---------------------------------------------------------------------------- learning curves


def write_log(path, columns: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(columns).to_csv(path, index=False)


def fold_logs(cfg):
    models = cfg.paths.path("models")
    log = {"epoch": [0, 0, 1, 1], "step": [1, 1, 2, 2], "train/loss": [2.0, None, 1.5, None],
           "train/lr": [1e-4, None, 1e-3, None], "valid/logloss": [None, 2.1, None, 1.7]}
    for fold in (0, 1):
        write_log(models / "head" / f"fold{fold}" / "logs" / "metrics.csv", log)
    write_log(models / "pseudo" / "fold1" / "iteration_2" / "logs" / "metrics.csv", log)
    write_log(models / "oldmodel" / "logs" / "metrics.csv", log)  # the pre-CV layout: not a fold model's log


def test_cv_learning_curves_show_training_loss_and_lr_per_fold_only(smoke_cfg):
    fold_logs(smoke_cfg)
    charts = view_of(smoke_cfg).learning
    assert [c.model for c in charts] == ["head", "pseudo"]
    head, pseudo = charts
    # a loss line per fold; both folds share one learning-rate schedule, drawn once
    assert list(head.losses) == ["fold0", "fold1"] and list(head.rates) == ["every fold"] and head.rate_x == "epoch"
    assert list(pseudo.losses) == ["fold1 iteration_2"]
    assert {"fold0", "fold1", "every fold", "Loss", "Learning rate", "epoch"} <= drawn(head)
    curves = section(page_of(smoke_cfg), "Learning curves")
    assert chart_titles(curves) == ["head: learning curves", "pseudo: learning curves"]
    assert "valid/logloss" not in curves and "valid" not in svg_texts(curves)  # fold models never validate in cv


def test_cross_pseudo_students_are_averaged_into_the_models_dvc_plot(smoke_cfg):
    """Cross pseudo-labelling logs one run per student (``iteration_1/half_<h>``): DVC's learning plot is
    the model's, the mean over folds and students, like any fold model's."""
    models = smoke_cfg.paths.path("models")
    for fold in (0, 1):
        for half, losses in ((0, [2.0, 1.0]), (1, [4.0, 3.0])):
            write_log(models / "pseudo" / f"fold{fold}" / "iteration_1" / f"half_{half}" / "logs" / "metrics.csv",
                      {"epoch": [0, 1], "step": [1, 2], "train/loss": losses, "train/lr": [1e-4, 1e-3]})
    (chart,) = view_of(smoke_cfg).learning
    assert {"fold0 iteration_1 half_0", "fold1 iteration_1 half_1"} <= set(chart.losses)
    run(smoke_cfg)
    loss = pd.read_csv(smoke_cfg.paths.path("plots") / "learning" / "pseudo.csv")
    assert loss.to_dict(orient="list") == {"epoch": [0, 1], "train_loss": [3.0, 2.0]}
    assert sorted(p.name for p in (smoke_cfg.paths.path("plots") / "learning").iterdir()) == ["pseudo.csv"]


def test_holdout_learning_curves_keep_the_validation_loss(tmp_path):
    cfg = load_profile("smoke", {"split.validation": "holdout"}).at(tmp_path)
    fold_logs(cfg)
    view = view_of(cfg)
    assert not view.cv and {"fold0 train", "fold0 valid"} <= set(view.learning[0].losses)


def monitored_log(path, groups=("head", "pg2")):
    """A fine-tune log with Lightning's LearningRateMonitor: per-step rows carry only step and lr-*."""
    rows = []
    for epoch in (0, 1):
        for step in range(epoch * 3, epoch * 3 + 3):
            rows.append({"step": step} | {f"lr-AdamW/{g}": 1e-3 * (step + 1) / (10 if i else 1) for i, g in enumerate(groups)})
        rows.append({"epoch": epoch, "step": epoch * 3 + 2, "train/loss": 2.0 - epoch, "train/lr": 1e-3})
    write_log(path, pd.DataFrame(rows).to_dict(orient="list"))


def test_learning_rates_come_from_the_lr_monitor_per_step_when_logged(smoke_cfg):
    for fold in (0, 1):
        monitored_log(smoke_cfg.paths.fold_models("finetune", fold) / "logs" / "metrics.csv")
    (chart,) = view_of(smoke_cfg).learning
    assert chart.model == "finetune" and chart.rate_x == "optimizer step"
    assert list(chart.rates) == ["head", "pg2"]  # one line per param group, shared by the folds
    assert {"head", "pg2", "optimizer step"} <= drawn(chart)
    run(smoke_cfg)
    rate = pd.read_csv(smoke_cfg.paths.path("plots") / "learning_rate" / "finetune.csv")
    assert list(rate.columns) == ["step", "lr"] and rate["step"].tolist() == list(range(6))
    assert rate["lr"].tolist() == pytest.approx([1e-3 * (s + 1) for s in range(6)])  # the top group (head)
    loss = pd.read_csv(smoke_cfg.paths.path("plots") / "learning" / "finetune.csv")
    assert loss.to_dict(orient="list") == {"epoch": [0, 1], "train_loss": [2.0, 1.0]}


def test_a_log_without_any_learning_rate_still_draws_its_loss(smoke_cfg):
    write_log(smoke_cfg.paths.fold_models("head", 0) / "logs" / "metrics.csv", {"epoch": [0, 1], "train/loss": [2.0, 1.5]})
    (chart,) = view_of(smoke_cfg).learning
    assert chart.model == "head" and list(chart.losses) == ["fold0"] and chart.rates == {}
    assert "Learning rate" not in drawn(chart)
    run(smoke_cfg)
    plots_dir = smoke_cfg.paths.path("plots")
    assert (plots_dir / "learning" / "head.csv").exists() and not (plots_dir / "learning_rate").exists()


def test_training_logs_are_in_natural_order(tmp_path):
    for folder in ("member10/fold0", "member2/fold10", "member2/fold2", "head/fold0"):
        write_log(tmp_path / folder / "logs" / "metrics.csv", {"epoch": [0], "train/loss": [1.0]})
    logs = plots.training_logs(tmp_path)
    assert list(logs) == ["head", "member2", "member10"]
    assert [run for run, _ in logs["member2"]] == ["fold2", "fold10"]


# ---------------------------------------------------------------------------- out-of-fold predictions


def constructed_oof(cfg, n=40, sources=("ensemble",), classes=CLASSES, has_groups=True):
    """competition.json, split.csv (two folds), two real tiny JPEGs in data/raw with train_index.csv,
    out-of-fold predictions per source (calibrate/ensemble: data/predictions/<stage>/oof.csv; models:
    data/predictions/oof/<model>/oof.csv)."""
    rng = np.random.default_rng(0)
    ids = [f"img_{i}.jpg" for i in range(n)]
    labels = np.arange(n) % len(classes)
    folds = (np.arange(n) // 2) % 2
    raw = cfg.paths.path("raw")
    write_competition(raw, Competition(tuple(classes), "img", has_groups, "subject" if has_groups else "image",
                                       "folder", "synthetic"))
    groups = [f"p00{f}" for f in folds] if has_groups else ids
    split = pd.DataFrame({"id": ids, "label": [classes[c] for c in labels], "group": groups, "split": "train",
                          "fold": folds})
    cfg.paths.path("split_csv").parent.mkdir(parents=True, exist_ok=True)
    split.to_csv(cfg.paths.path("split_csv"), index=False)
    (raw / "imgs/train/c0").mkdir(parents=True)
    for img in ids[:2]:
        Image.new("RGB", (64, 48), (200, 30, 30)).save(raw / "imgs/train/c0" / img)
    pd.DataFrame({"id": ids, "path": [f"imgs/train/c0/{i}" for i in ids], "label": classes[0],
                  "group": groups if has_groups else ""}).to_csv(raw / "train_index.csv", index=False)
    for source in sources:
        probs = rng.dirichlet(np.ones(len(classes)), size=n)
        probs[np.arange(n), labels] += rng.random(n) * 2
        folder = (cfg.paths.path("predictions") / source if source in ("calibrate", "ensemble")
                  else cfg.paths.oof_predictions(source))
        write_predictions(folder / "oof.csv", ids, probs / probs.sum(1, keepdims=True), classes, folds=folds)
    return ids, labels


def test_report_draws_each_section_from_the_best_predictions(smoke_cfg):
    constructed_oof(smoke_cfg, sources=("head", "ensemble", "calibrate"))
    fold_logs(smoke_cfg)
    view = view_of(smoke_cfg)
    p = view.predictions
    assert p.source == "calibrate"  # calibrate > ensemble > ... > head
    assert (p.n_images, p.validation, p.path) == (40, "2-fold cross-validation grouped by subject",
                                                  "data/predictions/calibrate/oof.csv")
    assert view.validation == "2-fold cross-validation grouped by subject"
    assert p.confusion.title == "Confusion matrix: calibrate, out-of-fold" and p.per_class.title == "Log loss per true class"
    assert p.per_group.title == "Log loss per subject" and p.group == "subject"
    assert view.calibration.curve.title == "Calibration curve: calibrate, out-of-fold"
    assert list(p.views) == ["random correct", "random incorrect", "most correct per class", "most incorrect per class",
                             "most uncertain"]
    thumbs = [t for views in p.views.values() for t in views]
    assert p.images_found and any(t.uri for t in thumbs) and any(t.uri is None for t in thumbs)  # 2 of 40 images exist
    page = page_of(smoke_cfg)
    for text in ("<table class='cm'>", "Confusion matrix: calibrate, out-of-fold", "Log loss per true class",
                 "Log loss per subject", "Calibration curve: calibrate, out-of-fold", "head: learning curves",
                 "<h3>random correct</h3>", "<h3>most uncertain</h3>",
                 "40 labelled images, each predicted by a model that never trained on it (2-fold cross-validation "
                 "grouped by subject), from data/predictions/calibrate/oof.csv",
                 "Validation: 2-fold cross-validation grouped by subject."):
        assert text in page
    assert page.count("data:image/jpeg;base64,") >= 1  # thumbnails embedded; missing files keep their caption
    assert "<div class='noimg'></div>" in page


def test_report_falls_back_to_a_gathered_model_and_ignores_old_valid_files(smoke_cfg):
    constructed_oof(smoke_cfg, sources=("finetune", "head"))
    write_predictions(smoke_cfg.paths.path("predictions") / "calibrate" / "valid.csv", ["img_0.jpg"],
                      np.full((1, 10), 0.1), CLASSES)  # the pre-CV layout
    p = view_of(smoke_cfg).predictions
    assert p.source == "finetune" and p.path == "data/predictions/oof/finetune/oof.csv"
    assert p.confusion.matrix.shape == (10, 10) and p.confusion.matrix.sum() == 40  # all 40 rows, 10 classes


def test_confusion_matrix_counts_every_oof_row_once(smoke_cfg):
    ids, labels = constructed_oof(smoke_cfg, n=40)
    preds = find_oof_predictions(smoke_cfg)
    assert isinstance(preds, OOFPredictions) and preds.probs.shape == (40, 10)  # fold column skipped
    assert list(preds.ids) == ids and (preds.labels == labels).all()
    assert predictions.confusion_matrix(preds.labels, preds.predicted, 10).sum() == 40


def test_confusion_matrix_keeps_a_row_and_column_for_every_class():
    labels, predicted = np.array([0, 0, 2, 2, 2]), np.array([0, 2, 2, 2, 0])
    expected = np.zeros((4, 4), dtype=np.int64)
    np.add.at(expected, (labels, predicted), 1)
    matrix = predictions.confusion_matrix(labels, predicted, 4)
    assert matrix.dtype == np.int64 and (matrix == expected).all() and matrix[1].sum() == matrix[:, 3].sum() == 0


def test_report_names_classes_from_the_predictions_header_and_says_validation_is_per_image(smoke_cfg):
    """Any competition: class names come from the predictions file (here 5 string names, one needing
    escaping), and without groups the page says the folds are over images, never "whole drivers"."""
    classes = ("cat", "dog", "fox & hound", "owl", "yak")
    constructed_oof(smoke_cfg, n=30, classes=classes, has_groups=False)
    p = view_of(smoke_cfg).predictions
    assert p.confusion.classes == list(classes) and p.confusion.matrix.shape == (5, 5)
    assert p.per_class.labels == list(classes) and p.per_group is None and p.group == "group"
    assert p.validation == "2-fold cross-validation over images (this competition has no groups)"
    assert {t.true for views in p.views.values() for t in views} <= set(classes)
    page = page_of(smoke_cfg)
    head = "".join(f"<th>{name}</th>" for name in ("cat", "dog", "fox &amp; hound", "owl", "yak"))
    assert f"<table class='cm'><tr><th></th>{head}</tr>" in page  # confusion matrix: 5 x 5, header order
    assert page.count("<tr><th>owl</th>") == 1 and page.split("<table class='cm'>")[1].split("</table>")[0].count("<tr>") == 6
    assert ">fox &amp; hound</text>" in page  # per-class log loss bar label
    assert "true yak" in page and "pred c0" not in page and "<th>c0</th>" not in page
    assert "This competition has no groups: no per-group breakdown." in page
    assert "whole drivers" not in page and "State Farm" not in page


def test_holdout_validation_keeps_the_held_out_wording(tmp_path):
    cfg = load_profile("smoke", {"split.validation": "holdout"}).at(tmp_path)
    constructed_oof(cfg)
    assert view_of(cfg).validation == "whole held-out groups of subject"
    assert "Validation: whole held-out groups of subject." in page_of(cfg)


def test_report_refuses_a_split_label_outside_the_predictions_classes_naming_its_row(smoke_cfg):
    """An unknown label is reported at its own row of split.csv."""
    constructed_oof(smoke_cfg)
    split_csv = smoke_cfg.paths.path("split_csv")
    split = pd.read_csv(split_csv)
    split.loc[7, "label"] = "c10"
    split.iloc[::-1].to_csv(split_csv, index=False)  # reversed: row 7 of the data is row 34 of the file
    with pytest.raises(BadInputError, match="label 'c10' is not a class") as info:
        run(smoke_cfg)
    assert info.value.file == split_csv and info.value.row == 34


def test_five_views_follow_the_course_definitions(tmp_path):
    probs = np.full((4, 10), 0.01)
    probs[0, 0], probs[1, 0], probs[2, 1], probs[3, 0] = 0.91, 0.6, 0.91, 0.3  # rows 0,1 right; 2,3 wrong
    probs[3, 5] = 0.29  # row 3: top two almost tied
    probs /= probs.sum(1, keepdims=True)
    preds = OOFPredictions("x", tmp_path / "oof.csv", np.array(["a", "b", "c", "d"]), probs,
                           np.array([0, 0, 0, 5]), list(CLASSES))
    views = predictions.five_views(preds)
    assert views["most correct per class"] == [0]  # predicted c0 and right, highest p(c0)
    assert views["most incorrect per class"] == [3, 2]  # per predicted class: c0 -> row 3, c1 -> row 2
    assert views["most uncertain"][0] == 3
    assert sorted(views["random correct"]) == [0, 1] and sorted(views["random incorrect"]) == [2, 3]


# ---------------------------------------------------------------------------- DVC views


def read_scores(cfg, rerun: bool = True) -> dict[str, dict]:
    if rerun:
        run(cfg)
    return {p.stem: json.loads(p.read_text()) for p in sorted(cfg.paths.path("scores").glob("*.json"))}


def test_scores_are_one_compact_file_per_model_then_ensemble_and_calibrate(smoke_cfg):
    """DVC draws a row per file and a column per key: per model its CV figures and hidden-test ones."""
    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4, "member0": 0.45})
    ensemble_json(smoke_cfg)
    calibrate_json(smoke_cfg)
    scores = read_scores(smoke_cfg)
    assert sorted(scores) == ["calibrate", "ensemble", "finetune", "head", "member0"]
    assert scores["head"] == pytest.approx({"cv_logloss": 0.5, "cv_logloss_std": 0.1414214, "cv_acc": 0.8,
                                            "test_logloss": 0.6, "test_acc": 0.7})
    assert scores["calibrate"] == {"cv_logloss": 0.33, "cv_acc": 0.85, "test_logloss": 0.44, "test_acc": 0.75}
    assert set(scores["ensemble"]) == {"cv_logloss", "cv_acc", "test_logloss", "test_acc"}


def test_scores_without_hidden_labels_or_in_holdout_mode(tmp_path):
    cfg = load_profile("smoke", {"split.validation": "holdout"}).at(tmp_path)
    oof_json(cfg, {"head": 0.5}, test=False, validation="holdout")
    assert read_scores(cfg) == {"head": pytest.approx({"valid_logloss": 0.5, "valid_logloss_std": 0.1414214,
                                                       "valid_acc": 0.8})}


def test_a_model_dropped_from_the_config_leaves_no_stale_score(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5, "member7": 0.4})
    assert sorted(read_scores(smoke_cfg)) == ["head", "member7"]
    oof_json(smoke_cfg, {"head": 0.5})
    assert sorted(read_scores(smoke_cfg)) == ["head"]


def test_a_non_finite_figure_is_refused_and_the_last_scores_stay(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5})
    run(smoke_cfg)
    oof_json(smoke_cfg, {"head": float("nan")})
    with pytest.raises(StageError, match=r"head\.json: a score is not finite .*column cv_logloss"):
        run(smoke_cfg)
    assert read_scores(smoke_cfg, rerun=False)["head"]["cv_logloss"] == 0.5


def test_plot_data_for_dvc_confusion_and_calibration(smoke_cfg):
    ids, labels = constructed_oof(smoke_cfg, n=40, sources=("head", "calibrate"))
    run(smoke_cfg)
    plots_dir = smoke_cfg.paths.path("plots")
    confusion = pd.read_csv(plots_dir / "confusion.csv", dtype=str)
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 40  # one row per image
    assert confusion["actual"].tolist() == [CLASSES[c] for c in labels]  # class names, as DVC's template shows them
    assert set(confusion["predicted"]) <= set(CLASSES)
    calibration = pd.read_csv(plots_dir / "calibration.csv")
    assert list(calibration.columns) == ["bin", "confidence", "accuracy", "perfectly_calibrated", "count"]
    assert calibration["count"].sum() == 40 and (calibration["confidence"] == calibration["perfectly_calibrated"]).all()
    for path in [*plots_dir.rglob("*.csv"), *smoke_cfg.paths.path("scores").glob("*.json")]:
        assert not re.search(r"\b(nan|inf)\b", path.read_text(), re.IGNORECASE), path


def test_per_group_log_loss_names_the_competition_group(smoke_cfg):
    constructed_oof(smoke_cfg)
    p = view_of(smoke_cfg).predictions
    assert p.per_class.title == "Log loss per true class" and p.per_group.title == "Log loss per subject"
    assert set(p.per_group.labels) == {"p000", "p001"} and sum(p.per_group.counts) == 40  # a bar per driver
    assert p.per_group.reference == p.per_class.reference  # the overall log loss to compare with
    assert any(t.startswith("all images: ") for t in drawn(p.per_group))
    page = page_of(smoke_cfg)
    assert chart_titles(section(page, "Log loss per class and per subject")) == ["Log loss per true class",
                                                                                 "Log loss per subject"]


# ---------------------------------------------------------------------------- timings and the run


def test_timings_config_and_revision(smoke_cfg, monkeypatch):
    stage_json(smoke_cfg, "ingest", {"seconds": 1.5})
    stage_json(smoke_cfg, "head@0", {"seconds": 30.0, "valid_logloss": 1.0})
    view = view_of(smoke_cfg)
    assert view.timings.title == "Seconds per stage run (sum 0.5 min)"
    assert (view.timings.labels, view.timings.values) == (["ingest", "head@0"], [1.5, 30.0])
    assert {"ingest", "head@0", "30.0 s"} <= drawn(view.timings)
    assert view.params.startswith("profile: smoke") and view.profile == "smoke"
    assert view.revision == Revision(None, missing="none (not a git checkout, or no commit yet)")  # said, not failed
    page = page_of(smoke_cfg)
    assert chart_titles(section(page, "Stage timings")) == ["Seconds per stage run (sum 0.5 min)"]
    run_part = section(page, "Run: revision and config")
    assert "<details><summary>Config of this run (params.yaml)</summary><pre>profile: smoke" in run_part
    assert "not a git checkout" in run_part

    def no_git(*args, **kwargs):  # git missing altogether must not fail the stage either
        raise FileNotFoundError("git")

    monkeypatch.setattr(collect.subprocess, "run", no_git)
    assert view_of(smoke_cfg).revision.missing == "unknown (git is not available)"
    assert "unknown (git is not available)" in page_of(smoke_cfg)


def test_revision_of_a_git_checkout_names_the_files_changed_since(tmp_path):
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    git("add", "params.yaml")
    git("commit", "-qm", "x")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert collect.git_revision(tmp_path) == Revision(sha, [])
    (tmp_path / "params.yaml").write_text("a: 2\n")  # what `dvc exp run -S` does
    assert collect.git_revision(tmp_path) == Revision(sha, ["params.yaml"])
    cfg = load_profile("smoke").at(tmp_path)
    assert f"Revision: <code>{sha}</code> with uncommitted changes to params.yaml." in page_of(cfg)


def test_the_header_says_which_kind_of_submission_was_made(smoke_cfg):
    code = {"kind": "code", "dry_run": False, "kernel": "me/comp-inference", "kernel_version": 3}
    assert submission(code) == Submission("code", False, "me/comp-inference", 3)
    assert submission({"kind": "file", "dry_run": True}) == Submission("file", True)
    assert submission({}) is None
    stage_json(smoke_cfg, "submit", code)
    meta = page_of(smoke_cfg).split("<p class='meta'>", 1)[1].split("</p>", 1)[0]
    assert "a code competition's notebook" in meta and "https://www.kaggle.com/code/me/comp-inference" in meta
    assert "version 3" in meta and meta.endswith(", uploaded.")
    stage_json(smoke_cfg, "submit", {"kind": "file", "dry_run": True})
    meta = page_of(smoke_cfg).split("<p class='meta'>", 1)[1].split("</p>", 1)[0]
    assert "the file submissions/submission.csv, dry run: nothing uploaded." in meta


# ---------------------------------------------------------------------------- the page


def test_the_page_is_one_self_contained_file_with_every_section_in_order(smoke_cfg):
    constructed_oof(smoke_cfg, sources=("calibrate",))
    fold_logs(smoke_cfg)
    page = page_of(smoke_cfg)
    anchors = re.findall(r"<h2 id='([a-z]+)'>", page)
    assert anchors == [anchor for anchor, _ in render.SECTIONS]
    assert re.findall(r"<a href='#([a-z]+)'>", page) == anchors  # the table of contents
    assert "<style>" in page and "<link" not in page and "<script" not in page  # inline CSS, no script
    for ref in re.findall(r"(?:src|href)='([^']*)'", page):  # nothing fetched: anchors and data URIs only
        assert ref.startswith(("#", "data:image/jpeg;base64,")), ref


def test_the_page_escapes_text_from_figures(smoke_cfg):
    stage_json(smoke_cfg, "ingest", {"source": "<b>x</b> & y", "nested": {"k<": 0.5}})
    page = page_of(smoke_cfg)
    assert "&lt;b&gt;x&lt;/b&gt; &amp; y" in page and "<b>x</b>" not in page
    assert "<tr><td>k&lt;</td><td>0.5000</td></tr>" in page  # nested figures: a table, floats to 4 decimals
