"""``calibrate`` stage: make the ensemble's probabilities honest before Kaggle's log loss sees them.

Log loss punishes confident mistakes without limit, so two cheap post-hoc fixes are fitted on the
out-of-fold (OOF) rows and applied to OOF and test predictions alike:

- **temperature scaling**: ``softmax(log p / T)``; one scalar ``T`` fitted on OOF log loss
  (``T > 1`` softens an over-confident model, ``T < 1`` sharpens an under-confident one). It never
  changes the argmax, so accuracy is untouched.
- **clipping** every probability to ``[(1 - hi) / (K - 1), hi]`` (K classes) and renormalising the
  row, ``hi`` chosen on OOF rows. A wrong 0.999 leaves the true class at most 0.001 (6.9 nats); clipped
  at 0.93 with ten classes it keeps at least 0.07 / 9 (4.9 nats). The State Farm notebook of fast.ai's
  Practical Deep Learning for Coders, part 1 (2017), lesson 4, clipped its submission at 0.93.

Fitting on the rows the figures are reported on is optimistic, so the calibration is nested: each
fold's rows are calibrated by a fit on the other folds (cv mode; holdout mode: folds over the
validation groups). It is applied to test only when that nested log loss beats no calibration
(``applied``), and ``oof.csv``/``valid_logloss`` are the nested rows: the honest estimate of the
submission's single fold models. ``curve`` is the OOF reliability curve (confidence against accuracy).
The fitting functions are pure (``pipeline.ensembling.calibration``).

The submission averages the K fold models on test drivers no model saw; each OOF row was predicted by
one fold model. ``submission_logloss_estimate`` is the estimate chosen by ``calibrate.estimate``, with
an interval over the test's drivers (``submission_logloss_low``/``_high``); every candidate is kept in
``submission_estimates`` (``pipeline.ensembling.estimate``; docs/results.md measures them against
hidden test labels).

Reads ``data/predictions/ensemble/{oof,test,test_folds}.csv`` and ``data/split.csv``; writes
``data/predictions/calibrate/{oof,test}.csv`` and ``reports/stages/calibrate.json``.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from pipeline.chain import Calibration, apply_calibration
from pipeline.competition import read_competition
from pipeline.config import Config
from pipeline.ensembling.calibration import cross_fitted_probs, fit_calibration, reliability_curve
from pipeline.ensembling.estimate import estimate_submission
from pipeline.folds import nested_folds
from pipeline.metrics import (
    OOF_FILE,
    evaluate,
    kaggle_logloss,
    read_hidden_labels,
    write_predictions,
    write_stage_metrics,
)
from pipeline.outoffold import (
    TEST_FOLDS_FILE,
    aligned_rows,
    fold_averaging_gain,
    read_checked_predictions,
    read_held_out,
    read_test_folds,
)

SOURCE_STAGE = "ensemble"
# ---------------------------------------------------------------------------- inputs


# ---------------------------------------------------------------------------- stage


def rounded(figures: dict[str, float]) -> dict[str, float]:
    return {key: round(float(value), 6) for key, value in figures.items()}


def run(cfg: Config) -> dict:
    start = time.perf_counter()
    source = cfg.paths.path("predictions") / SOURCE_STAGE
    out = cfg.paths.path("predictions") / "calibrate"
    classes = list(read_competition(cfg.paths.path("raw")).classes)
    held = read_held_out(cfg, classes)
    oof_ids, oof_probs = read_checked_predictions(source / OOF_FILE, classes, SOURCE_STAGE)
    test_imgs, test_probs = read_checked_predictions(source / "test.csv", classes, SOURCE_STAGE)
    oof_probs = aligned_rows(source / OOF_FILE, oof_ids, oof_probs, held.ids, SOURCE_STAGE)
    labels = held.labels

    opts = cfg.calibrate
    folds = nested_folds(held.folds, held.groups, cfg.split.validation, opts.cross_fit_folds, opts.seed)
    nested = cross_fitted_probs(oof_probs, labels, folds, opts.temperature, opts.clip)
    nested_logloss = None if nested is None else kaggle_logloss(nested, labels)
    fitted = fit_calibration(oof_probs, labels, opts.temperature, opts.clip)
    # Apply the calibration only if it also helps folds it was not fitted on: a fit on a few groups
    # can lower their own log loss and still raise everyone else's.
    trusted = nested_logloss is not None and nested_logloss < kaggle_logloss(oof_probs, labels)
    calibration = fitted if trusted else Calibration()
    oof_cal = nested if trusted else oof_probs  # the honest rows: each fold calibrated by the others' fit
    test_cal = apply_calibration(test_probs, calibration)
    per_fold = read_test_folds(source / TEST_FOLDS_FILE, test_imgs, classes, SOURCE_STAGE)
    per_fold_cal = None if per_fold is None else np.stack([apply_calibration(p, calibration) for p in per_fold])
    gain = None if per_fold_cal is None else fold_averaging_gain(test_cal, per_fold_cal)
    estimate = estimate_submission(oof_cal, labels, held.groups, held.folds, test_cal, per_fold_cal,
                                   sorted(np.unique(held.folds).tolist()), gain, opts.estimate, opts.test_groups,
                                   opts.interval)
    write_predictions(out / OOF_FILE, held.ids, oof_cal, classes, folds=held.folds)
    write_predictions(out / "test.csv", test_imgs, test_cal, classes)

    hidden = read_hidden_labels(cfg.paths.path("hidden"), classes)
    before = evaluate(oof_probs, labels, test_imgs, test_probs, hidden)
    after = evaluate(oof_cal, labels, test_imgs, test_cal, hidden)
    figures: dict = {
        **rounded(after),
        **rounded({f"{key}_before": value for key, value in before.items()}),
        "validation": cfg.split.validation,
        # what averaging the K fold models gains on test, label-free (None: one model, nothing averaged)
        "fold_averaging_gain": None if gain is None else round(gain, 6),
        # the submission's estimated log loss (calibrate.estimate), its interval over test drivers, and
        # every candidate estimate (pipeline/ensembling/estimate.py)
        **estimate.as_figures(),
        # nested: each fold calibrated by a fit on the others (None with a single group)
        "valid_logloss_nested": None if nested_logloss is None else round(nested_logloss, 6),
        "valid_logloss_insample": round(kaggle_logloss(apply_calibration(oof_probs, fitted), labels), 6),
        "applied": trusted,
        **rounded({f"fitted_{key}": value for key, value in asdict(fitted).items()}),
        **rounded(asdict(calibration)),
        "curve": reliability_curve(oof_cal, labels),
        "n_valid": len(held),
        "n_valid_groups": int(len(np.unique(held.groups))),
        "n_test": len(test_imgs),
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_stage_metrics(cfg.paths.stage_metrics_file("calibrate"), figures)
    return figures
