"""Kaggle's metric and per-stage figures.

Multi-class log loss as Kaggle scores it: each row is divided by its sum, then every probability is
clipped to [1e-15, 1 - 1e-15]. Each stage writes its figures to reports/stages/<stage>.json; the
``report`` stage collects them into reports/metrics.json.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import MODELS
from pipeline.errors import StageError
from pipeline.io import atomic_write_json, read_json

KAGGLE_EPS = 1e-15


def normalise(probs: np.ndarray) -> np.ndarray:
    """Each row (the last axis) divided by its sum, as Kaggle rescales a submission's rows before scoring."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs / probs.sum(axis=-1, keepdims=True)


def kaggle_logloss(probs: np.ndarray, labels: np.ndarray, eps: float = KAGGLE_EPS) -> float:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (n, k) with n == len(labels); got {probs.shape} and {labels.shape}")
    probs = np.clip(normalise(probs), eps, 1 - eps)
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

ID_COLUMN = "id"  # predictions files: id, then one probability column per class in competition order
FOLD_COLUMN = "fold"  # out-of-fold files: id, fold, then the classes
OOF_FILE = "oof.csv"  # a model's predictions of the labelled rows it never trained on


def require_finite(values: np.ndarray, what: str, where: Path | str, columns: Sequence[str] | None = None) -> None:
    """No stage writes a NaN or infinite prediction, metric or loss: refuse, naming the file and the
    first bad row (header = row 1) and column (its name when ``columns`` gives them, else its number)."""
    values = np.asarray(values, dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, *col = np.argwhere(bad)[0]
        column = f", column {columns[col[0]] if columns is not None else col[0] + 1}" if col else ""
        raise StageError(f"{where}: {what} is not finite at row {row + 2}{column} ({values[tuple([row, *col])]}); "
                         "nothing was written: check the inputs (e.g. a corrupt feature chunk) and rerun")


def write_predictions(path: Path, ids: list[str] | np.ndarray, probs: np.ndarray, classes: Sequence[str],
                      folds: Sequence[int] | np.ndarray | None = None) -> Path:
    """Predictions as ``id,<class columns>`` (``id,fold,<class columns>`` for out-of-fold predictions
    with ``folds``), written atomically; refused when any value is not finite."""
    import pandas as pd

    from pipeline.io import atomic_write_csv

    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(ids), len(classes)):
        raise ValueError(f"probs shape {probs.shape} does not match {len(ids)} images x {len(classes)} classes")
    require_finite(probs, "a predicted probability", path, classes)
    df = pd.DataFrame(probs, columns=list(classes))
    if folds is not None:
        df.insert(0, FOLD_COLUMN, np.asarray(folds, dtype=np.int64))
    df.insert(0, ID_COLUMN, list(ids))
    return atomic_write_csv(path, df, float_format="%.6g")


def read_predictions(path: Path) -> tuple[list[str], np.ndarray]:
    """(ids, probabilities) of a predictions file; the columns after ``id`` in file order. Ids are
    kept verbatim (an id ``NA`` stays ``NA``); an empty probability cell reads as NaN, so callers can
    name its row and column."""
    import pandas as pd

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return df[ID_COLUMN].tolist(), df.drop(columns=meta_columns(df.columns)).replace("", "nan").to_numpy(dtype=np.float64)


def meta_columns(columns: Sequence[str]) -> list[str]:
    """``id``, and ``fold`` where it is the second column (out-of-fold files)."""
    columns = list(columns)
    return [ID_COLUMN] + ([FOLD_COLUMN] if len(columns) > 1 and columns[1] == FOLD_COLUMN else [])


def read_oof(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(ids, fold per row, probabilities) of an out-of-fold predictions file (``id,fold,<classes>``)."""
    import pandas as pd

    from pipeline.errors import BadInputError

    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    if meta_columns(df.columns) != [ID_COLUMN, FOLD_COLUMN]:
        raise BadInputError(path, f"expected columns {ID_COLUMN},{FOLD_COLUMN},<classes>", row=1)
    folds = pd.to_numeric(df[FOLD_COLUMN], errors="coerce").to_numpy()
    if np.isnan(folds).any():
        row = int(np.argmax(np.isnan(folds)))
        raise BadInputError(path, f"fold {df[FOLD_COLUMN].iloc[row]!r} is not an integer", row=row + 2)
    probs = df.drop(columns=[ID_COLUMN, FOLD_COLUMN]).replace("", "nan").to_numpy(dtype=np.float64)
    return df[ID_COLUMN].tolist(), folds.astype(np.int64), probs


def prediction_classes(path: Path) -> list[str]:
    """The class columns of a predictions file, in order."""
    import pandas as pd

    columns = list(pd.read_csv(path, nrows=0).columns)
    return [c for c in columns if c not in meta_columns(columns)]


def read_hidden_labels(hidden_dir: Path, classes: Sequence[str]) -> dict[str, int] | None:
    """Hidden test labels (synthetic data only), id -> class index; None when there are none.
    For scoring only: no training stage may call this."""
    import pandas as pd

    from pipeline.competition import label_indices

    path = Path(hidden_dir) / "test_labels.csv"
    if not path.exists():
        return None
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    return dict(zip(df["id"], label_indices(df["label"].tolist(), classes, path).tolist(), strict=True))


def evaluate(valid_probs: np.ndarray, valid_labels: np.ndarray, test_ids: list[str] | None = None,
             test_probs: np.ndarray | None = None, hidden: dict[str, int] | None = None) -> dict[str, float]:
    """The figures every predicting stage reports: valid_logloss/acc, and test_logloss/acc when
    hidden labels exist."""
    figures = {"valid_logloss": kaggle_logloss(valid_probs, valid_labels), "valid_acc": accuracy(valid_probs, valid_labels)}
    if hidden is not None and test_ids is not None and test_probs is not None:
        labels = np.array([hidden[i] for i in test_ids])
        figures["test_logloss"] = kaggle_logloss(test_probs, labels)
        figures["test_acc"] = accuracy(test_probs, labels)
    for key, value in figures.items():
        if not np.isfinite(value):
            raise StageError(f"{key} is {value}: the predictions hold non-finite values; nothing was written")
    return figures


def chain_steps(models: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, bool]]:
    """``(predecessor, model, worse)`` for each step of the chain head -> finetune -> pseudo
    (``config.MODELS``: each trains from its predecessor's weights) among ``models`` (name -> figures
    with ``valid_logloss``); ``worse``: the model's log loss is higher than its predecessor's (a tie is
    no worse). A chain model absent from ``models`` is skipped: the step is from the nearest one before."""
    present = [m for m in MODELS if isinstance(models.get(m, {}).get("valid_logloss"), int | float)]
    return [(predecessor, model, models[model]["valid_logloss"] > models[predecessor]["valid_logloss"])
            for predecessor, model in itertools.pairwise(present)]


def keep_tta_if_better(labels: np.ndarray, valid: np.ndarray, test: np.ndarray,
                       valid_tta: Callable[[], np.ndarray] | None,
                       test_tta: Callable[[], np.ndarray], decide: bool = True) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Test-time augmentation is kept only when it lowers validation log loss: (valid, test, figures)
    with the TTA predictions or the plain ones. ``valid_tta`` None means no TTA passes; ``test_tta`` is
    called only when TTA is kept (it is the expensive half). ``decide=False`` (out-of-fold rows, which
    must not steer their own model) always keeps TTA and only reports both figures."""
    figures: dict[str, Any] = {"valid_logloss_plain": kaggle_logloss(valid, labels)}
    if valid_tta is None:
        return valid, test, figures
    augmented = valid_tta()
    figures["valid_logloss_tta"] = kaggle_logloss(augmented, labels)
    figures["tta_used"] = figures["valid_logloss_tta"] < figures["valid_logloss_plain"] or not decide
    if figures["tta_used"]:
        return augmented, test_tta(), figures
    return valid, test, figures


# ---------------------------------------------------------------------------- breakdowns (report)


def row_logloss(probs: np.ndarray, labels: np.ndarray, eps: float = KAGGLE_EPS) -> np.ndarray:
    """Each row's term of Kaggle's log loss (row normalised, then clipped): their mean over any subset
    of rows (a class, a group) is that subset's log loss."""
    probs = np.clip(normalise(probs), eps, 1 - eps)
    return -np.log(probs[np.arange(len(labels)), np.asarray(labels, dtype=np.int64)])


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> tuple[list[float], list[float], list[int]]:
    """Per non-empty equal-width bin of top-class probability: mean confidence, accuracy, image count
    (calibrate.json's ``curve``, the report's calibration chart and plots/calibration.csv). A confidence
    on an edge opens its bin: 0.3 is in [0.3, 0.4). Not sklearn's ``calibration_curve``, which puts an
    edge in the bin below and returns no counts."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    conf, acc, count = [], [], []
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            conf.append(float(confidence[inside].mean()))
            acc.append(float(correct[inside].mean()))
            count.append(int(inside.sum()))
    return conf, acc, count


def expected_calibration_error(confidence: Sequence[float], accuracy: Sequence[float], count: Sequence[int]) -> float:
    """Count-weighted mean |accuracy - confidence| over the bins (0 when there are no images)."""
    total = sum(count)
    return float(sum(n * abs(a - c) for c, a, n in zip(confidence, accuracy, count, strict=True)) / total) if total else 0.0
