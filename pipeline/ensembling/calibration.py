"""Fitting the calibration the calibrate stage applies (``pipeline.chain.Calibration``): a temperature
``softmax(log p / T)`` and a clip of every probability to ``[(1 - hi) / (K - 1), hi]``, each fitted on
out-of-fold log loss and kept only when it helps; the cross-fitted (nested) version that scores every
row with a fit on the other folds; and the reliability curve. Pure functions."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from pipeline.chain import Calibration, apply_calibration, clip_probs, temperature_scale
from pipeline.metrics import kaggle_logloss, reliability_bins

TEMPERATURE_BOUNDS = (0.05, 20.0)
# Upper clips searched: coarse around that notebook's 0.93, then ever lighter clipping
# down to 1 - 1e-6. The lower clip is (1 - hi) / (K - 1), so a row at hi with the rest at lo sums to 1.
CLIP_GRID = np.unique(np.concatenate([np.linspace(0.5, 0.99, 50), 1 - np.logspace(-2, -6, 17)]))


def fit_temperature(probs: np.ndarray, labels: np.ndarray, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The T minimising validation log loss. The loss is convex in 1/T (log-softmax of a linear
    function), hence unimodal in log T, so a bounded 1-D search finds the optimum."""

    def loss(log_t: float) -> float:
        return kaggle_logloss(temperature_scale(probs, float(np.exp(log_t))), labels)

    result = minimize_scalar(loss, bounds=(np.log(bounds[0]), np.log(bounds[1])), method="bounded", options={"xatol": 1e-4})
    best = float(np.exp(result.x))
    # Keep the identity unless the fit really helps (guards flat or degenerate validation sets).
    return best if loss(float(result.x)) < loss(0.0) else 1.0


def fit_clip(probs: np.ndarray, labels: np.ndarray, grid: np.ndarray = CLIP_GRID) -> tuple[float, float]:
    """(lo, hi) from ``grid`` minimising validation log loss; (0, 1) (no clipping) unless one helps."""
    best_lo, best_hi, best_loss = 0.0, 1.0, kaggle_logloss(probs, labels)
    for hi in grid:
        lo = (1.0 - hi) / (probs.shape[1] - 1)
        loss = kaggle_logloss(clip_probs(probs, lo, hi), labels)
        if loss < best_loss:
            best_lo, best_hi, best_loss = float(lo), float(hi), loss
    return best_lo, best_hi


def fit_calibration(probs: np.ndarray, labels: np.ndarray, temperature: bool = True, clip: bool = True) -> Calibration:
    """Temperature first, then the clip fitted on the temperature-scaled probabilities."""
    t = fit_temperature(probs, labels) if temperature else 1.0
    scaled = temperature_scale(probs, t) if t != 1.0 else probs
    lo, hi = fit_clip(scaled, labels) if clip else (0.0, 1.0)
    return Calibration(temperature=t, clip_lo=lo, clip_hi=hi)


def cross_fitted_probs(probs: np.ndarray, labels: np.ndarray, folds: np.ndarray | None, temperature: bool = True,
                       clip: bool = True) -> np.ndarray | None:
    """Every row calibrated by a fit on the other folds' rows: an honest estimate of what calibration
    does to unseen groups. None without at least two folds."""
    if folds is None or len(np.unique(folds)) < 2:
        return None
    out = np.empty_like(np.asarray(probs, dtype=np.float64))
    for fold in np.unique(folds):
        held = folds == fold
        calibration = fit_calibration(probs[~held], labels[~held], temperature, clip)
        out[held] = apply_calibration(probs[held], calibration)
    return out


def reliability_curve(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """The OOF calibration curve as calibrate.json keeps it: ``confidence``, ``accuracy`` and ``n`` of
    each non-empty bin (``pipeline.metrics.reliability_bins``)."""
    return [{"confidence": c, "accuracy": a, "n": n} for c, a, n in zip(*reliability_bins(probs, labels, bins), strict=True)]
