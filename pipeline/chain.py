"""What the chain does to test predictions after its fold models, as pure functions: the ensemble's
weighted mean (``ensemble``), the fitted calibration (``calibrate``) and the test halves of cross
pseudo-labelling (``pseudo``).

The ensemble and calibrate stages import them from here, and so does the code-competition notebook
(``pipeline.kernel``), which must apply exactly what the stages applied; tests/test_kernel.py checks
the notebook against the stages' outputs.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.metrics import KAGGLE_EPS, normalise

Mean = Literal["arithmetic", "geometric"]


def combine(member_probs: np.ndarray, weights: np.ndarray, mean: Mean = "arithmetic") -> np.ndarray:
    """Weighted mean of ``(models, n, classes)`` probabilities, rows renormalised (``pipeline.stages.ensemble``)."""
    member_probs = np.asarray(member_probs, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    if mean == "geometric":
        # A log-linear pool: one model's confident "no" vetoes a class; floored at Kaggle's epsilon.
        logp = np.log(np.clip(normalise(member_probs), KAGGLE_EPS, 1.0))
        logits = np.tensordot(weights, logp, axes=1)
        return normalise(np.exp(logits - logits.max(axis=1, keepdims=True)))
    return normalise(np.tensordot(weights, normalise(member_probs), axes=1))


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration (``pipeline.stages.calibrate``); the identity is ``Calibration()``."""

    temperature: float = 1.0
    clip_lo: float = 0.0
    clip_hi: float = 1.0


def temperature_scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)``, computed on log-probabilities floored at Kaggle's epsilon."""
    logits = np.log(np.clip(normalise(probs), KAGGLE_EPS, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)  # stable softmax
    return normalise(np.exp(logits))


def clip_probs(probs: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to [lo, hi], then renormalise rows."""
    return normalise(np.clip(normalise(probs), lo, hi))


def apply_calibration(probs: np.ndarray, calibration: Calibration) -> np.ndarray:
    out = normalise(probs)
    if calibration.temperature != 1.0:
        out = temperature_scale(out, calibration.temperature)
    if calibration.clip_hi < 1.0:
        out = clip_probs(out, calibration.clip_lo, calibration.clip_hi)
    return out


def image_halves(ids: Sequence[str]) -> np.ndarray:
    """0 or 1 per image (``pipeline.stages.pseudo``): a balanced split fixed by the ids alone, not by their
    order (ids sorted by a hash of the id, then alternated)."""
    order = sorted(range(len(ids)), key=lambda i: (zlib.crc32(ids[i].encode()), ids[i]))
    halves = np.empty(len(ids), dtype=np.int64)
    halves[order] = np.arange(len(ids)) % 2
    return halves
