"""Which estimate of the submission's log loss can a user trust? For finished runs with hidden test
labels (``benchmarks/ensemble_seeds.py --workdir``: one folder per seed; ``benchmarks/real_images.py
--workdir``: ``run_<kind><seed>``), every candidate of ``pipeline.ensembling.estimate`` against the
submission's hidden-test log loss, from the files the calibrate stage wrote: signed relative error
per run and candidate (negative = optimistic), whether the hidden test lies inside the group-bootstrap
interval, and per candidate the mean signed error, the worst error and the interval's coverage.

    python benchmarks/submission_estimate.py RUN_DIR [RUN_DIR ...] [--test-groups N] [--out results.json]

A run folder holds ``data/`` (split.csv, predictions/{ensemble,calibrate}, hidden/test_labels.csv)
and ``reports/stages/calibrate.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.chain import Calibration, apply_calibration
from pipeline.config import CalibrateConfig
from pipeline.ensembling.estimate import METHODS, estimate_submission, row_losses
from pipeline.metrics import prediction_classes, read_oof, read_predictions
from pipeline.outoffold import TEST_FOLDS_FILE, fold_averaging_gain, read_test_folds

GOAL_ERROR = 0.15


def run_figures(run: Path, test_groups: float | None, level: float) -> dict:
    data = run / "data"
    split = pd.read_csv(data / "split.csv", dtype=str, keep_default_na=False).set_index("id")
    oof_ids, oof_folds, oof = read_oof(data / "predictions" / "calibrate" / "oof.csv")
    classes = prediction_classes(data / "predictions" / "calibrate" / "oof.csv")
    labels = np.array([classes.index(c) for c in split.loc[oof_ids, "label"]])
    groups = split.loc[oof_ids, "group"].to_numpy()
    test_ids, test = read_predictions(data / "predictions" / "calibrate" / "test.csv")
    hidden = pd.read_csv(data / "hidden" / "test_labels.csv", dtype=str).set_index("id")["label"]
    test_labels = np.array([classes.index(c) for c in hidden.loc[test_ids]])
    figures = json.loads((run / "reports" / "stages" / "calibrate.json").read_text())
    calibration = Calibration(figures["temperature"], figures["clip_lo"], figures["clip_hi"])
    fold_ids = sorted(np.unique(oof_folds).astype(int).tolist())
    per_fold = read_test_folds(data / "predictions" / "ensemble" / TEST_FOLDS_FILE, test_ids, classes, "ensemble")
    if per_fold is not None:
        per_fold = np.stack([apply_calibration(p, calibration) for p in per_fold])
    gain = None if per_fold is None else fold_averaging_gain(test, per_fold)
    hidden_test = float(row_losses(test, test_labels).mean())
    out = {"run": str(run), "hidden_test": hidden_test, "n_groups": int(len(np.unique(groups))), "candidates": {}}
    estimate = estimate_submission(oof, labels, groups, oof_folds, test, per_fold, fold_ids, gain, "cv", test_groups, level)
    out["test_groups"] = estimate.test_groups
    for method in METHODS:
        est = estimate.centred_on(method)
        out["candidates"][method] = {"value": est.value, "low": est.low, "high": est.high,
                                     "error": est.value / hidden_test - 1, "inside": est.low <= hidden_test <= est.high}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--test-groups", type=float, default=None, help="groups in the test set (default: from its size)")
    parser.add_argument("--level", type=float, default=CalibrateConfig().interval, help="the interval's coverage")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = [run_figures(run, args.test_groups, args.level) for run in args.runs]
    print("| run | hidden test | " + " | ".join(f"{m}: estimate [interval] (error)" for m in METHODS) + " |")
    print("| --- | --- |" + " --- |" * len(METHODS))
    for r in rows:
        cells = [f"{c['value']:.4f} [{c['low']:.3f}, {c['high']:.3f}]{'' if c['inside'] else ' out'} ({c['error']:+.1%})"
                 for c in r["candidates"].values()]
        print(f"| {r['run']} | {r['hidden_test']:.4f} | " + " | ".join(cells) + " |")
    print()
    for method in METHODS:
        errors = np.array([r["candidates"][method]["error"] for r in rows])
        inside = sum(r["candidates"][method]["inside"] for r in rows)
        print(f"{method}: mean signed error {errors.mean():+.1%}, worst {np.abs(errors).max():.1%}, within "
              f"{GOAL_ERROR:.0%} on {int((np.abs(errors) <= GOAL_ERROR).sum())} of {len(rows)}, hidden test inside "
              f"the interval on {inside} of {len(rows)}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
