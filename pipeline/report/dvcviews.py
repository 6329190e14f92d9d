"""The files DVC's own views read.

- ``reports/scores/<model>.json``: the compact DVC metrics, one small file per model (head, finetune,
  pseudo, member<m>, ensemble, calibrate) with its CV (or validation) log loss, the spread over folds,
  accuracy, and the hidden-test figures where hidden labels exist. DVC draws one row per file and one
  column per key, so ``dvc metrics show`` is a model-by-score table that fits a terminal.
- ``reports/plots/``: the data of DVC's ``plots:`` (``dvc plots show/diff``): training loss and
  learning rate per model (mean over folds), the confusion rows and the calibration bins of the best
  out-of-fold predictions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.io import atomic_dir, atomic_write_csv, atomic_write_json, remove_leftovers
from pipeline.metrics import reliability_bins, require_finite
from pipeline.report.plots import calibration_table, confusion_rows, learning_tables, training_logs
from pipeline.report.predictions import FINAL_STAGES, OOFPredictions
from pipeline.report.view import is_number, submission_estimate


def scores(metrics: dict[str, dict], cv: bool) -> dict[str, dict[str, float]]:
    """model (and ensemble, calibrate) -> its compact DVC metrics: ``cv_logloss``, ``cv_logloss_std``
    (over folds, models only), ``cv_acc`` (``valid_*`` in holdout mode), ``test_logloss``,
    ``test_acc`` where hidden labels exist, and calibrate's ``submission_estimate``."""
    est = "cv" if cv else "valid"
    rows = dict((metrics.get("oof") or {}).get("models", {}))
    rows |= {stage: metrics[stage] for stage in FINAL_STAGES if metrics.get(stage)}
    table = {}
    for name, figs in rows.items():
        spread = figs.get("fold_logloss_std") if len(figs.get("folds", {})) >= 2 else None
        picked = {f"{est}_logloss": figs.get("valid_logloss"), f"{est}_logloss_std": spread,
                  f"{est}_acc": figs.get("valid_acc"), "test_logloss": figs.get("test_logloss"),
                  "test_acc": figs.get("test_acc")}
        if (estimate := submission_estimate(figs)) is not None:  # calibrate: the submission's (its interval and
            picked["submission_estimate"] = estimate.value  # method are in calibrate.json: the table stays 120 wide)
        table[name] = {k: float(v) for k, v in picked.items() if is_number(v)}
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
