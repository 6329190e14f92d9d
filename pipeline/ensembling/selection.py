"""Ensemble selection on out-of-fold (OOF) predictions: Caruana et al. (2004) greedy hill climbing
with replacement (or equal weights), its nested (cross-fitted) estimate, and the same weights applied
to each fold's models alone (the per-fold test predictions the submission estimate reads)."""

from __future__ import annotations

import numpy as np

from pipeline.chain import Mean, combine
from pipeline.ensembling.smoothing import smooth_with_neighbours
from pipeline.metrics import kaggle_logloss
from pipeline.outoffold import ModelOOF


def hill_climb(member_probs: np.ndarray, labels: np.ndarray, steps: int, mean: Mean = "arithmetic") -> np.ndarray:
    """Ensemble selection with replacement (Caruana et al. 2004): start from the best single model,
    add whichever model (again, possibly) lowers the log loss of the mean most, ``steps`` times; the
    weights are the pick counts of the best-scoring prefix, normalised (non-negative, sum 1)."""
    n_models = len(member_probs)
    singles = [kaggle_logloss(member_probs[m], labels) for m in range(n_models)]
    counts = np.zeros(n_models)
    counts[int(np.argmin(singles))] = 1
    best_counts, best_loss = counts.copy(), min(singles)
    for _ in range(steps - 1):
        trials = [kaggle_logloss(combine(member_probs, counts + np.eye(n_models)[m], mean), labels) for m in range(n_models)]
        pick = int(np.argmin(trials))
        counts[pick] += 1
        if trials[pick] < best_loss - 1e-12:
            best_counts, best_loss = counts.copy(), trials[pick]
    return best_counts / best_counts.sum()


def fit_weights(member_probs: np.ndarray, labels: np.ndarray, method: str, steps: int, mean: Mean) -> np.ndarray:
    if method == "equal":
        return np.full(len(member_probs), 1.0 / len(member_probs))
    return hill_climb(member_probs, labels, steps, mean)


def nested_combination(member_probs: np.ndarray, labels: np.ndarray, folds: np.ndarray | None, method: str,
                       steps: int, mean: Mean) -> tuple[np.ndarray, list[list[float]]]:
    """Every OOF row combined with weights fitted on the other folds' rows (the honest estimate), and
    each fold's weights. Without folds to nest over (a single validation group) the full-fit weights."""
    if folds is None:
        weights = fit_weights(member_probs, labels, method, steps, mean)
        return combine(member_probs, weights, mean), [weights.tolist()]
    out = np.empty(member_probs.shape[1:], dtype=np.float64)
    per_fold = []
    for fold in np.unique(folds):
        held = folds == fold
        weights = fit_weights(member_probs[:, ~held], labels[~held], method, steps, mean)
        out[held] = combine(member_probs[:, held], weights, mean)
        per_fold.append(weights.tolist())
    return out, per_fold


def fold_tests(models: list[ModelOOF], weights: np.ndarray, mean: Mean, neighbours: np.ndarray | None) -> np.ndarray | None:
    """(folds, test images, classes): the ensemble of each fold's models alone, smoothed like the
    submitted test predictions; None unless every model has the same number of per-fold predictions."""
    if any(m.test_folds is None for m in models) or len({len(m.test_folds) for m in models}) != 1:
        return None
    combined = [combine(np.stack([m.test_folds[k] for m in models]), weights, mean) for k in range(len(models[0].test_folds))]
    return np.stack([probs if neighbours is None else smooth_with_neighbours(probs, neighbours) for probs in combined])
