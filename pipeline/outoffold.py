"""Out-of-fold (OOF) predictions: the labelled rows each model predicts without having trained on
them, the evidence every data-driven decision downstream is fitted on (ensemble weights, neighbour
smoothing, calibration).

In cv mode every labelled image is held out by exactly one fold's models, so a model's OOF rows are
all labelled images; in holdout mode they are the validation split (one fold). Files:

- ``data/predictions/folds/<model>/<k>/oof.csv``: ``id,<classes>``, fold model k's held-out rows.
- ``data/predictions/oof/<model>/oof.csv``: ``id,fold,<classes>``, every OOF row once, in split.csv
  order; ``test.csv``: ``id,<classes>``, the mean of the K fold models' test predictions, in test
  index order; ``test_folds.csv``: ``id,fold,<classes>``, each fold model's own test predictions, fold
  after fold. Written by the ``oof`` stage; the ensemble, calibrate and report stages read them.

Why the per-fold test predictions: an OOF row is predicted by one fold model, a test row by the mean of
K of them, and the mean is better than each. ``fold_averaging_gain`` estimates by how much, without
labels, so the CV estimate can speak for the averaged submission.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.competition import TEST_INDEX, label_indices
from pipeline.config import Config
from pipeline.errors import BadInputError, StageError
from pipeline.folds import held_out_mask
from pipeline.metrics import (
    ID_COLUMN,
    KAGGLE_EPS,
    OOF_FILE,
    accuracy,
    kaggle_logloss,
    normalise,
    prediction_classes,
    read_oof,
    read_predictions,
    write_predictions,
)

TEST_FOLDS_FILE = "test_folds.csv"


@dataclass(frozen=True)
class HeldOut:
    """Every labelled row some fold model predicts out of fold, in split.csv order."""

    ids: list[str]
    labels: np.ndarray  # class index
    groups: np.ndarray
    folds: np.ndarray  # the fold whose models hold the row out (0 in holdout mode)

    def __len__(self) -> int:
        return len(self.ids)


def read_held_out(cfg: Config, classes: Sequence[str]) -> HeldOut:
    """The OOF rows of the config's folds (cv: every labelled image; holdout: the validation split)."""
    path = cfg.paths.path("split_csv")
    if not path.exists():
        raise StageError(f"{path} not found: run the split stage first")
    split = pd.read_csv(path, dtype=str, keep_default_na=False)
    labels = label_indices(split["label"].tolist(), classes, path)
    fold_of = np.full(len(split), -1, dtype=np.int64)
    for fold in cfg.split.fold_ids:
        fold_of[held_out_mask(split, fold, cfg.split.validation)] = fold
    rows = np.flatnonzero(fold_of >= 0)
    return HeldOut(split["id"].to_numpy()[rows].tolist(), labels[rows], split["group"].to_numpy()[rows], fold_of[rows])


def read_test_ids(cfg: Config) -> list[str]:
    path = cfg.paths.path("raw") / TEST_INDEX
    if not path.exists():
        raise StageError(f"{path} not found: run the ingest stage first")
    return pd.read_csv(path, dtype=str, keep_default_na=False)["id"].tolist()


def check_classes(path: Path, classes: Sequence[str], produced_by: str) -> None:
    if not path.exists():
        raise StageError(f"{path} not found: run the {produced_by} stage first")
    if prediction_classes(path) != list(classes):
        raise BadInputError(path, f"class columns must be {','.join(classes)} (the competition's), "
                                  f"got {','.join(prediction_classes(path))}", row=1)


def aligned(path: Path, ids: Sequence[str], classes: Sequence[str], produced_by: str) -> np.ndarray:
    """The rows of a predictions file in ``ids`` order; refused (file, row) unless it has the
    competition's classes and exactly these ids, each once, with finite probabilities."""
    check_classes(path, classes, produced_by)
    got, probs = read_predictions(path)
    return in_order(path, got, probs, ids, produced_by)


def in_order(path: Path, got: Sequence[str], probs: np.ndarray, ids: Sequence[str], produced_by: str,
             lines: Sequence[int] | None = None) -> np.ndarray:
    """``probs`` (read from ``path``, row i for id ``got[i]`` on line ``lines[i]``, default i + 2) in
    ``ids`` order, rows normalised; refused unless ``got`` is exactly ``ids``, each once, with finite
    probabilities >= 0."""
    lines = [i + 2 for i in range(len(got))] if lines is None else list(lines)
    position: dict[str, int] = {}
    for i, image_id in enumerate(got):
        if image_id in position:  # name the repeat, where the file goes wrong
            raise BadInputError(path, f"id {image_id!r} appears twice (first at row {lines[position[image_id]]})", row=lines[i])
        position[image_id] = i
    missing = [i for i in ids if i not in position]
    if missing or len(got) != len(ids):
        extra = sorted(set(got) - set(ids))
        what = f"{len(missing)} expected id(s) missing (e.g. {missing[0]!r})" if missing else f"unexpected id {extra[0]!r}"
        raise StageError(f"{path}: {what}; rerun {produced_by}")
    out = probs[[position[i] for i in ids]]
    bad = ~np.isfinite(out) | (out < 0)
    if bad.any():
        r = int(np.argwhere(bad)[0][0])
        raise BadInputError(path, f"{ids[r]}: probabilities must be finite and >= 0", row=lines[position[ids[r]]])
    return normalise(out)


def write_test_folds(path: Path, test_ids: Sequence[str], per_fold: np.ndarray, folds: Sequence[int],
                     classes: Sequence[str]) -> Path:
    """``per_fold`` (folds, test images, classes): each fold model's test predictions as one file."""
    per_fold = np.asarray(per_fold, dtype=np.float64)
    if len(per_fold) != len(folds):
        raise ValueError(f"{len(per_fold)} folds of test predictions, {len(folds)} fold ids")
    return write_predictions(path, list(test_ids) * len(per_fold), per_fold.reshape(-1, len(classes)), classes,
                             folds=np.repeat(np.asarray(folds, dtype=np.int64), len(test_ids)))


def read_test_folds(path: Path, test_ids: Sequence[str], classes: Sequence[str], produced_by: str) -> np.ndarray | None:
    """(folds, test images, classes) from a ``test_folds.csv``, each fold's rows in ``test_ids`` order;
    None when there is no such file (written before it existed: nothing to average over)."""
    if not path.exists():
        return None
    check_classes(path, classes, produced_by)
    got, fold_of, probs = read_oof(path)
    per_fold = []
    for fold in np.unique(fold_of):
        rows = np.flatnonzero(fold_of == fold)
        per_fold.append(in_order(path, [got[r] for r in rows], probs[rows], test_ids, produced_by, rows + 2))
    return np.stack(per_fold) if per_fold else None


def fold_averaging_gain(averaged: np.ndarray, per_fold: np.ndarray | Sequence[np.ndarray]) -> float | None:
    """How much lower the log loss of ``averaged`` (the predictions submitted: the K fold models
    combined) is expected to be than that of one fold model's ``per_fold[k]``, without labels: the
    mean over folds and rows of KL(averaged || per_fold[k]). If a row's label is drawn from
    ``averaged`` (it is calibrated), E[-log p_k,y] - E[-log averaged_y] is exactly that divergence.
    OOF rows are each predicted by one fold model, so the CV log loss minus this gain estimates the
    averaged submission. None with fewer than two folds (nothing is averaged)."""
    if len(per_fold) < 2:
        return None
    avg = normalise(np.clip(np.asarray(averaged, dtype=np.float64), KAGGLE_EPS, 1.0))
    gains = []
    for probs in per_fold:
        p = normalise(np.clip(np.asarray(probs, dtype=np.float64), KAGGLE_EPS, 1.0))
        gains.append(float((avg * (np.log(avg) - np.log(p))).sum(axis=1).mean()))
    return float(np.mean(gains))


@dataclass
class ModelOOF:
    """One model's out-of-fold predictions (rows as ``HeldOut``) and its test predictions."""

    name: str
    oof: np.ndarray
    test: np.ndarray
    test_folds: np.ndarray | None = None  # (folds, test images, classes): each fold model's own


def read_model_oof(cfg: Config, name: str, held: HeldOut, test_ids: Sequence[str], classes: Sequence[str],
                   folder: Path | None = None, produced_by: str = "oof") -> ModelOOF:
    """A gathered model (``data/predictions/oof/<name>``) or a stage's folder with the same files,
    checked to hold every OOF row with its fold."""
    folder = folder or cfg.paths.oof_predictions(name)
    path = folder / OOF_FILE
    if not path.exists():
        raise StageError(f"{path} not found: run the {produced_by} stage first")
    ids, folds, _ = read_oof(path)
    oof = aligned(path, held.ids, classes, produced_by)
    fold_of = dict(zip(ids, folds.tolist(), strict=True))
    wrong = [i for i, f in zip(held.ids, held.folds.tolist(), strict=True) if fold_of[i] != f]
    if wrong:
        raise StageError(f"{path}: {wrong[0]!r} is in fold {fold_of[wrong[0]]}, split.csv says otherwise: rerun {produced_by}")
    return ModelOOF(name, oof, aligned(folder / "test.csv", test_ids, classes, produced_by),
                    read_test_folds(folder / TEST_FOLDS_FILE, test_ids, classes, produced_by))


def fold_figures(probs: np.ndarray, labels: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    """Log loss and accuracy per fold, with the mean and standard deviation of the fold log losses."""
    per_fold = {}
    for fold in np.unique(folds).tolist():
        rows = folds == fold
        per_fold[str(fold)] = {"logloss": kaggle_logloss(probs[rows], labels[rows]), "acc": accuracy(probs[rows], labels[rows]),
                               "n": int(rows.sum())}
    losses = [f["logloss"] for f in per_fold.values()]
    return {"folds": per_fold, "fold_logloss_mean": float(np.mean(losses)),
            "fold_logloss_std": float(np.std(losses, ddof=1)) if len(losses) > 1 else 0.0}


def read_checked_predictions(path: Path, classes: list[str], produced_by: str) -> tuple[list[str], np.ndarray]:
    """A predictions file, refused with file, row and column when a row is not a usable distribution."""
    if not path.exists():
        raise StageError(f"{path} not found: run the {produced_by} stage first")
    header = [ID_COLUMN, *classes]
    try:
        got = [ID_COLUMN, *prediction_classes(path)]
        ids, probs = read_predictions(path)
    except (KeyError, ValueError) as err:
        raise BadInputError(path, f"expected columns {','.join(header)} with numeric probabilities ({err})", row=1) from None
    if got != header:
        raise BadInputError(path, f"expected columns {','.join(header)}, got {','.join(got)}", row=1)
    bad = ~np.isfinite(probs) | (probs < 0)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad)[0])
        raise BadInputError(path, f"{ids[i]}: {classes[j]} = {probs[i, j]} (probabilities must be finite and >= 0)",
                            row=i + 2)
    empty = ~(probs.sum(axis=1) > 0)
    if empty.any():
        i = int(np.argmax(empty))
        raise BadInputError(path, f"{ids[i]}: every probability is 0", row=i + 2)
    return ids, probs


def aligned_rows(path: Path, ids: list[str], probs: np.ndarray, wanted: list[str], produced_by: str) -> np.ndarray:
    """``probs`` (rows of ``path`` in ``ids`` order) reordered to ``wanted``; every wanted id exactly once."""
    position: dict[str, int] = {}
    for i, image_id in enumerate(ids):
        if image_id in position:  # name the repeat, where the file goes wrong
            raise BadInputError(path, f"id {image_id!r} appears twice (first at row {position[image_id] + 2})", row=i + 2)
        position[image_id] = i
    unknown = [i for i, image_id in enumerate(ids) if image_id not in set(wanted)]
    if unknown:
        raise BadInputError(path, f"{ids[unknown[0]]} is not an out-of-fold row of the split", row=unknown[0] + 2)
    missing = [image_id for image_id in wanted if image_id not in position]
    if missing:
        raise StageError(f"{path}: {len(missing)} row(s) missing (e.g. {missing[0]!r}): rerun the {produced_by} stage")
    return probs[[position[image_id] for image_id in wanted]]
