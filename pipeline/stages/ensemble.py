"""``ensemble`` stage: combine the models' out-of-fold (OOF) predictions into
``data/predictions/ensemble/{oof,test}.csv``, every decision fitted on OOF rows.

1. **Candidates**: every model the ``oof`` stage gathered (``ensemble.models()``: head, finetune,
   pseudo, and the members), each as its OOF and fold-averaged test predictions.
2. **Weights**: Caruana et al. (2004) ensemble selection: greedy hill climbing with replacement on
   OOF log loss, starting from the best single model; a model's weight is how often it was picked,
   the prefix of picks with the lowest loss is kept (``ensemble.weights: hill_climb``), or equal weights
   (``equal``). The mean is arithmetic or geometric (``ensemble.mean``).
3. **Nested estimate**: weights are fitted on OOF rows, so scoring them there is optimistic. Each fold's
   rows are combined with weights fitted on the other folds (cv mode; holdout mode: folds over the
   validation groups): ``valid_logloss`` is that nested figure and ``oof.csv`` holds those rows, so
   calibration downstream is fitted on honest inputs. When the nested ensemble is worse than the best
   single model, the best single model is used instead and the figures say so (``fallback``).
4. **Test-neighbour smoothing** (``pipeline.ensembling.smoothing``): each prediction averaged with its k nearest
   neighbours (cosine, cached conv features). k is chosen among 1, 2, 3, 5, 10 ... up to
   ``ensemble.neighbours`` on OOF log loss, each fold's rows smoothed among that fold's own images as
   test images are smoothed among test images, and applied only when it lowers the OOF log loss.
5. **Per-fold test predictions**: the same weights and smoothing applied to each fold's models alone
   (``test_folds.csv``), so calibrate can estimate what averaging the folds gains on test.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from pipeline.chain import combine
from pipeline.competition import read_competition
from pipeline.config import Config
from pipeline.convfeatures.cache import plain_features
from pipeline.ensembling.selection import fit_weights, fold_tests, nested_combination
from pipeline.ensembling.smoothing import (
    nearest_neighbours,
    smooth_with_neighbours,
    smooth_within_folds,
    smoothing_decision,
)
from pipeline.errors import StageError
from pipeline.folds import nested_folds
from pipeline.metrics import (
    OOF_FILE,
    accuracy,
    evaluate,
    kaggle_logloss,
    read_hidden_labels,
    write_predictions,
    write_stage_metrics,
)
from pipeline.outoffold import (
    TEST_FOLDS_FILE,
    ModelOOF,
    read_held_out,
    read_model_oof,
    read_test_ids,
    write_test_folds,
)

# ---------------------------------------------------------------------------- stage


def rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def run(cfg: Config) -> dict[str, Any]:
    start = time.perf_counter()
    opts = cfg.ensemble
    classes = list(read_competition(cfg.paths.path("raw")).classes)
    held = read_held_out(cfg, classes)
    test_ids = read_test_ids(cfg)
    hidden = read_hidden_labels(cfg.paths.path("hidden"), classes)
    models: list[ModelOOF] = [read_model_oof(cfg, name, held, test_ids, classes) for name in opts.models()]
    if not models:
        raise StageError("no ensemble candidates: set ensemble.include or ensemble.members")
    labels = held.labels
    stacked_oof, stacked_test = np.stack([m.oof for m in models]), np.stack([m.test for m in models])
    singles = {m.name: evaluate(m.oof, labels, test_ids, m.test, hidden) for m in models}
    best = min(singles, key=lambda name: singles[name]["valid_logloss"])

    weights = fit_weights(stacked_oof, labels, opts.weights, opts.hill_climb_steps, opts.mean)
    folds = nested_folds(held.folds, held.groups, cfg.split.validation, opts.cross_fit_folds, cfg.split.seed)
    oof, per_fold = nested_combination(stacked_oof, labels, folds, opts.weights, opts.hill_climb_steps, opts.mean)
    weights_by_fold = [dict(zip([m.name for m in models], w, strict=True)) for w in per_fold]
    insample = combine(stacked_oof, weights, opts.mean)
    fallback = kaggle_logloss(oof, labels) > singles[best]["valid_logloss"]
    if fallback:  # the combination does not beat its best candidate out of sample: use that candidate
        weights = np.eye(len(models))[[m.name for m in models].index(best)]
        oof = insample = stacked_oof[[m.name for m in models].index(best)]
    test = combine(stacked_test, weights, opts.mean)
    before = evaluate(oof, labels, test_ids, test, hidden)

    smoothing_folds = held.folds if cfg.split.validation == "cv" else np.zeros(len(held), dtype=np.int64)
    k, by_k, test_neighbours = 0, {}, None
    if opts.neighbours:
        features = plain_features(cfg.paths.path("features"), held.ids, ("train", "valid"))
        k, by_k = smoothing_decision(oof, labels, features, smoothing_folds, opts.neighbours)
        if k:
            oof = smooth_within_folds(oof, features, smoothing_folds, k)
            test_neighbours = nearest_neighbours(plain_features(cfg.paths.path("features"), test_ids, ("test",)), k)
            test = smooth_with_neighbours(test, test_neighbours)
    per_fold_test = fold_tests(models, weights, opts.mean, test_neighbours)

    out = cfg.paths.path("predictions") / "ensemble"
    # An earlier run's per-fold file would describe other predictions: gone first, written last, so a
    # run killed in between leaves none (calibrate then estimates nothing for averaging).
    (out / TEST_FOLDS_FILE).unlink(missing_ok=True)
    write_predictions(out / OOF_FILE, held.ids, oof, classes, folds=held.folds)
    write_predictions(out / "test.csv", test_ids, test, classes)
    if per_fold_test is not None:
        write_test_folds(out / TEST_FOLDS_FILE, test_ids, per_fold_test, cfg.split.fold_ids, classes)
    figures: dict[str, Any] = {
        # valid_* are the nested (honest) OOF figures of what is written
        **evaluate(oof, labels, test_ids, test, hidden),
        "validation": cfg.split.validation,
        "valid_logloss_insample": kaggle_logloss(insample, labels),
        "valid_logloss_before_smoothing": before["valid_logloss"],
        **({"test_logloss_before_smoothing": before["test_logloss"]} if "test_logloss" in before else {}),
        "weights_method": opts.weights,
        "mean": opts.mean,
        "weights": {m.name: float(w) for m, w in zip(models, weights, strict=True)},
        "weights_by_fold": weights_by_fold,
        "fallback": best if fallback else None,
        "best_model": best,
        "best_model_valid_logloss": singles[best]["valid_logloss"],
        "beats_best_model": bool(not fallback),
        "smoothing_k": k,
        "smoothing_applied": bool(k),
        "smoothing_valid_logloss_by_k": [[k_, v] for k_, v in by_k.items()],
        "candidates": singles,
        "n_candidates": len(models),
        "valid_acc_best_model": accuracy(stacked_oof[[m.name for m in models].index(best)], labels),
        "seconds": time.perf_counter() - start,
    }
    figures = rounded(figures)
    write_stage_metrics(cfg.paths.stage_metrics_file("ensemble"), figures)
    return figures
