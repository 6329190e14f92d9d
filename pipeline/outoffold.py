"""Out-of-fold (OOF) predictions: the labelled rows each model predicts without having trained on
them, the evidence every data-driven decision downstream is fitted on (ensemble weights, neighbour
smoothing, calibration).

In cv mode every labelled image is held out by exactly one fold's models, so a model's OOF rows are
all labelled images; in holdout mode they are the validation split (one fold). Files:

- ``data/predictions/folds/<model>/<k>/oof.csv``: ``id,<classes>``, fold model k's held-out rows.
- ``data/predictions/oof/<model>/oof.csv``: ``id,fold,<classes>``, every OOF row once, in split.csv
  order; ``test.csv``: ``id,<classes>``, the mean of the K fold models' test predictions, in test
  index order. Written by the ``oof`` stage; the ensemble, calibrate and report stages read them.
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
    OOF_FILE,
    accuracy,
    kaggle_logloss,
    prediction_classes,
    read_oof,
    read_predictions,
)


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


def aligned(path: Path, ids: Sequence[str], classes: Sequence[str], produced_by: str) -> np.ndarray:
    """The rows of a predictions file in ``ids`` order; refused (file, row) unless it has the
    competition's classes and exactly these ids, each once, with finite probabilities."""
    if not path.exists():
        raise StageError(f"{path} not found: run the {produced_by} stage first")
    if prediction_classes(path) != list(classes):
        raise BadInputError(path, f"class columns must be {','.join(classes)} (the competition's), "
                                  f"got {','.join(prediction_classes(path))}", row=1)
    got, probs = read_predictions(path)
    position: dict[str, int] = {}
    for i, image_id in enumerate(got):
        if image_id in position:  # name the repeat, where the file goes wrong
            raise BadInputError(path, f"id {image_id!r} appears twice (first at row {position[image_id] + 2})", row=i + 2)
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
        raise BadInputError(path, f"{ids[r]}: probabilities must be finite and >= 0", row=position[ids[r]] + 2)
    return out / out.sum(axis=1, keepdims=True)


@dataclass
class ModelOOF:
    """One model's out-of-fold predictions (rows as ``HeldOut``) and its test predictions."""

    name: str
    oof: np.ndarray
    test: np.ndarray


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
    return ModelOOF(name, oof, aligned(folder / "test.csv", test_ids, classes, produced_by))


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
