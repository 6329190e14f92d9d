"""Kaggle's metric and per-stage figures.

Multi-class log loss as Kaggle scores it: each row is divided by its sum, then every probability is
clipped to [1e-15, 1 - 1e-15]. Each stage writes its figures to reports/stages/<stage>.json; the
``report`` stage collects them into reports/metrics.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io import atomic_write_json, read_json

KAGGLE_EPS = 1e-15


def kaggle_logloss(probs: np.ndarray, labels: np.ndarray, eps: float = KAGGLE_EPS) -> float:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (n, k) with n == len(labels); got {probs.shape} and {labels.shape}")
    probs = probs / probs.sum(axis=1, keepdims=True)
    probs = np.clip(probs, eps, 1 - eps)
    return float(-np.mean(np.log(probs[np.arange(len(labels)), labels])))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.asarray(probs).argmax(axis=1) == np.asarray(labels)))


def write_stage_metrics(path: Path, figures: dict[str, Any]) -> Path:
    return atomic_write_json(path, figures)


def collect_stage_metrics(folder: Path, order: list[str]) -> dict[str, Any]:
    """Map of stage name to its figures, in DAG order, for the stages that wrote any."""
    found = {p.stem: read_json(p) for p in folder.glob("*.json")} if folder.exists() else {}
    ordered = {name: found.pop(name) for name in order if name in found}
    ordered.update(sorted(found.items()))
    return ordered
