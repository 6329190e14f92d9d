"""Test-neighbour smoothing: average each prediction with those of its k nearest neighbours in
conv-feature space.

Frames are video frames: an image's nearest neighbour is the same driver almost always and the same
class 99.5% of the time, so pooling a frame's prediction with its neighbours' removes much of the
per-frame noise (the 1st-place State Farm solution gained 0.10-0.12 log loss with k = 10 on VGG
pool5 features). It needs no labels, so it works on test images among themselves; its effect is
measured the same way among the validation images before it is trusted: ``smoothing_decision`` picks
k on OOF rows, each fold's rows smoothed among that fold's own images.
"""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors

from pipeline.metrics import kaggle_logloss


def nearest_neighbours(features: np.ndarray, k: int) -> np.ndarray:
    """``(n, min(k, n - 1))`` row numbers of each row's nearest other rows by cosine distance, nearest
    first. A row is never its own neighbour, even when exact duplicates tie with it at distance 0."""
    features = np.asarray(features, dtype=np.float32)
    n = len(features)
    k = min(int(k), n - 1)
    if k <= 0:
        return np.zeros((n, 0), dtype=np.int64)
    index = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute", n_jobs=-1).fit(features)
    found = index.kneighbors(features, return_distance=False)
    return drop_self(found, k)


def drop_self(found: np.ndarray, k: int) -> np.ndarray:
    """Remove each row's own index from its k + 1 neighbours; where a tie pushed it out of the list,
    drop the farthest instead, so every row keeps exactly k others."""
    n = len(found)
    is_self = found == np.arange(n)[:, None]
    is_self[~is_self.any(axis=1), -1] = True
    return found[~is_self].reshape(n, k).astype(np.int64)


def smooth_with_neighbours(probs: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Each row replaced by the mean of itself and its neighbours' rows (equal weights)."""
    probs = np.asarray(probs, dtype=np.float64)
    if neighbours.shape[1] == 0:
        return probs.copy()
    return (probs + probs[neighbours].sum(axis=1)) / (1 + neighbours.shape[1])


def neighbour_smoothing(probs: np.ndarray, features: np.ndarray, k: int) -> np.ndarray:
    """``probs`` smoothed over each row's k nearest rows in ``features``; unchanged for k = 0."""
    if k <= 0:
        return np.asarray(probs, dtype=np.float64).copy()
    return smooth_with_neighbours(probs, nearest_neighbours(features, k))


def candidate_ks(max_k: int) -> list[int]:
    """Neighbour counts tried: 1, 2, 3, 5, 10, 20, 50 up to ``max_k``, and ``max_k``."""
    return sorted({k for k in (1, 2, 3, 5, 10, 20, 50) if k < max_k} | ({max_k} if max_k > 0 else set()))


def smooth_within_folds(probs: np.ndarray, features: np.ndarray, folds: np.ndarray, k: int) -> np.ndarray:
    """Each row averaged with its k nearest rows of the same fold (as test rows among test rows)."""
    out = np.asarray(probs, dtype=np.float64).copy()
    for fold in np.unique(folds):
        rows = np.flatnonzero(folds == fold)
        out[rows] = smooth_with_neighbours(probs[rows], nearest_neighbours(features[rows], k))
    return out


def smoothing_decision(oof: np.ndarray, labels: np.ndarray, features: np.ndarray, folds: np.ndarray,
                       max_k: int) -> tuple[int, dict[int, float]]:
    """(k, OOF log loss by k): the neighbour count that lowers the OOF log loss most; 0 (off) when
    none lowers it. k is chosen, not fixed, because the right k follows the number of frames a group has
    per class, which differs between competitions and between real and synthetic data."""
    by_k = {k: kaggle_logloss(smooth_within_folds(oof, features, folds, k), labels) for k in candidate_ks(max_k)}
    if not by_k:
        return 0, by_k
    k = min(by_k, key=by_k.get)
    return (k if by_k[k] < kaggle_logloss(oof, labels) else 0), by_k
