"""Kaggle's metric and per-stage figures.

Multi-class log loss as Kaggle scores it: each row is divided by its sum, then every probability is
clipped to [1e-15, 1 - 1e-15]. Each stage writes its figures to reports/stages/<stage>.json; the
``report`` stage collects them into reports/metrics.json.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """Map of stage name to its figures, in ``order`` (the DAG), for the stages that wrote any;
    files of names outside ``order`` are ignored."""
    files = {name: folder / f"{name}.json" for name in order}
    return {name: read_json(path) for name, path in files.items() if path.exists()}


# ---------------------------------------------------------------------------- predictions

CLASS_COLUMNS = [f"c{i}" for i in range(10)]


def write_predictions(path: Path, imgs: list[str] | np.ndarray, probs: np.ndarray) -> Path:
    """Predictions as ``img,c0..c9`` (the submission layout), written atomically."""
    import pandas as pd

    from pipeline.io import atomic_write_csv

    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(imgs), len(CLASS_COLUMNS)):
        raise ValueError(f"probs shape {probs.shape} does not match {len(imgs)} images x 10 classes")
    df = pd.DataFrame(probs, columns=CLASS_COLUMNS)
    df.insert(0, "img", list(imgs))
    return atomic_write_csv(path, df, float_format="%.6g")


def read_predictions(path: Path) -> tuple[list[str], np.ndarray]:
    import pandas as pd

    df = pd.read_csv(path)
    return df["img"].tolist(), df[CLASS_COLUMNS].to_numpy(dtype=np.float64)


def read_hidden_labels(hidden_dir: Path) -> dict[str, int] | None:
    """Hidden test labels (synthetic data only), img -> class index; None when there are none.
    For scoring only: no training stage may call this."""
    import pandas as pd

    path = Path(hidden_dir) / "test_labels.csv"
    if not path.exists():
        return None
    df = pd.read_csv(path)
    return {img: int(c[1:]) for img, c in zip(df["img"], df["classname"], strict=True)}


def evaluate(valid_probs: np.ndarray, valid_labels: np.ndarray, test_imgs: list[str] | None = None,
             test_probs: np.ndarray | None = None, hidden: dict[str, int] | None = None) -> dict[str, float]:
    """The figures every predicting stage reports: valid_logloss/acc, and test_logloss/acc when
    hidden labels exist."""
    figures = {"valid_logloss": kaggle_logloss(valid_probs, valid_labels), "valid_acc": accuracy(valid_probs, valid_labels)}
    if hidden is not None and test_imgs is not None and test_probs is not None:
        labels = np.array([hidden[img] for img in test_imgs])
        figures["test_logloss"] = kaggle_logloss(test_probs, labels)
        figures["test_acc"] = accuracy(test_probs, labels)
    return figures


def keep_tta_if_better(labels: np.ndarray, valid: np.ndarray, test: np.ndarray,
                       valid_tta: Callable[[], np.ndarray] | None,
                       test_tta: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Test-time augmentation is kept only when it lowers validation log loss: (valid, test, figures)
    with the TTA predictions or the plain ones. ``valid_tta`` None means no TTA passes; ``test_tta`` is
    called only when TTA is kept (it is the expensive half)."""
    figures: dict[str, Any] = {"valid_logloss_plain": kaggle_logloss(valid, labels)}
    if valid_tta is None:
        return valid, test, figures
    augmented = valid_tta()
    figures["valid_logloss_tta"] = kaggle_logloss(augmented, labels)
    figures["tta_used"] = figures["valid_logloss_tta"] < figures["valid_logloss_plain"]
    if figures["tta_used"]:
        return augmented, test_tta(), figures
    return valid, test, figures
