"""``oof`` stage: gather each model's fold predictions into its out-of-fold (OOF) predictions and
score them: the cross-validation figures the ensemble, calibration, report and retrain decisions
steer by.

For every model (``ensemble.models()``: head, finetune, pseudo and each member<m>), the K fold models'
held-out rows are concatenated (every labelled image exactly once in cv mode, checked against
split.csv: a row held out twice or never is an error) and their test predictions averaged.

Figures per model: ``valid_logloss``/``valid_acc`` over all OOF rows (the CV estimate in cv mode),
the per-fold values with their mean and standard deviation, ``fold_averaging_gain`` (how much the mean
of the K fold models' test predictions is expected to gain over one of them, label-free:
``pipeline.outoffold``), and, on synthetic data, ``test_logloss``/``test_acc`` of the fold-averaged
test predictions beside them. finetune and pseudo also carry their
predecessor's figure and ``worse_than_predecessor`` (warned on stderr; the report flags it).

Outputs ``data/predictions/oof/<model>/{oof,test,test_folds}.csv`` (``pipeline.outoffold``) and ``reports/stages/oof.json``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from pipeline.competition import read_competition
from pipeline.config import Config, model_stage
from pipeline.errors import StageError
from pipeline.io import atomic_dir
from pipeline.metrics import (
    OOF_FILE,
    chain_steps,
    evaluate,
    read_hidden_labels,
    write_predictions,
    write_stage_metrics,
)
from pipeline.outoffold import (
    TEST_FOLDS_FILE,
    HeldOut,
    aligned,
    fold_averaging_gain,
    fold_figures,
    read_held_out,
    read_test_ids,
    write_test_folds,
)

STAGE = "oof"


def gather(cfg: Config, model: str, held: HeldOut, test_ids: list[str], classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(OOF probabilities in ``held`` order, each fold model's test probabilities) of ``model``'s fold models."""
    oof = np.full((len(held), len(classes)), np.nan)
    tests = []
    for fold in cfg.split.fold_ids:
        folder = cfg.paths.fold_predictions(model, fold)
        stage = model_stage(model, fold)
        rows = np.flatnonzero(held.folds == fold)
        oof[rows] = aligned(folder / OOF_FILE, [held.ids[r] for r in rows], classes, stage)
        tests.append(aligned(folder / "test.csv", test_ids, classes, stage))
    if np.isnan(oof).any():
        raise StageError(f"{model}: {int(np.isnan(oof).any(axis=1).sum())} labelled row(s) have no out-of-fold prediction")
    return oof, np.stack(tests)


def flag_regressions(models: dict[str, dict[str, Any]]) -> None:
    """Each stage of the chain head -> finetune -> pseudo starts from its predecessor: its figures say
    which one and whether it does worse out of fold (also on stderr), so no stage loses silently. The
    ensemble then weighs every model by its OOF evidence instead of trusting the chain's order."""
    for predecessor, model, worse in chain_steps(models):
        figures = models[model]
        figures["predecessor"] = predecessor
        figures["predecessor_valid_logloss"] = models[predecessor]["valid_logloss"]
        figures["worse_than_predecessor"] = worse
        if worse:
            print(f"[oof] warning: {model} is worse out of fold than {predecessor}, the stage it starts from "
                  f"(log loss {figures['valid_logloss']:.4f} > {models[predecessor]['valid_logloss']:.4f})",
                  file=sys.stderr)


def run(cfg: Config) -> dict[str, Any]:
    start = time.perf_counter()
    classes = list(read_competition(cfg.paths.path("raw")).classes)
    held = read_held_out(cfg, classes)
    test_ids = read_test_ids(cfg)
    hidden = read_hidden_labels(cfg.paths.path("hidden"), classes)
    models: dict[str, Any] = {}
    gathered = {model: gather(cfg, model, held, test_ids, classes) for model in cfg.ensemble.models()}
    with atomic_dir(cfg.paths.path("predictions") / "oof") as out:  # all models or none
        for model, (oof, tests) in gathered.items():
            test = tests.mean(axis=0)
            write_predictions(out / model / OOF_FILE, held.ids, oof, classes, folds=held.folds)
            write_predictions(out / model / "test.csv", test_ids, test, classes)
            write_test_folds(out / model / TEST_FOLDS_FILE, test_ids, tests, cfg.split.fold_ids, classes)
            models[model] = {**evaluate(oof, held.labels, test_ids, test, hidden), **fold_figures(oof, held.labels, held.folds),
                             "fold_averaging_gain": fold_averaging_gain(test, tests)}
    flag_regressions(models)
    best = min(models, key=lambda m: models[m]["valid_logloss"])
    figures = {"validation": cfg.split.validation, "n_folds": len(cfg.split.fold_ids), "n_oof": len(held),
               "models": models, "best_model": best, "best_valid_logloss": models[best]["valid_logloss"],
               "seconds": round(time.perf_counter() - start, 3)}
    write_stage_metrics(cfg.paths.stage_metrics_file(STAGE), figures)
    return figures
