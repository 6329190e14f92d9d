"""The labelled and test images every training stage reads: train and valid rows of the split (or of
the sample), test rows of the ingest index, with absolute paths and class indices in the
competition's class order (``pipeline.competition``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.competition import TEST_INDEX, TRAIN_INDEX, label_indices, read_competition
from pipeline.config import Config
from pipeline.errors import StageError
from pipeline.folds import held_out_mask

COLUMNS = ["id", "path", "label"]


def read_csv_of_strings(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def read_image_tables(cfg: Config, use_sample: bool = False, fold: int | None = None) -> dict[str, pd.DataFrame]:
    """id, path, label per split. Train/valid come from the split (or the sample's split when
    ``use_sample``), test from data/raw/test_index.csv; paths are absolute; test labels are empty.
    With ``fold``: train and valid of that fold model (``pipeline.folds.held_out_mask``): in cv mode
    valid is the fold's rows and train every other labelled row."""
    split = read_split_with_paths(cfg, use_sample)
    raw = cfg.paths.path("raw")
    test_index = raw / TEST_INDEX
    if not test_index.exists():
        raise StageError(f"{test_index} not found: run the ingest stage first")
    test = read_csv_of_strings(test_index)
    test["path"] = [str(raw / p) for p in test["path"]]
    test["label"] = ""
    if fold is None:
        held = (split["split"] == "valid").to_numpy()
        train = (split["split"] == "train").to_numpy()
    else:
        held = held_out_mask(split, fold, cfg.split.validation)
        train = ~held
    return {
        "valid": split.loc[held, COLUMNS].reset_index(drop=True),
        "test": test[COLUMNS].reset_index(drop=True),
        "train": split.loc[train, COLUMNS].reset_index(drop=True),
    }


def read_split_with_paths(cfg: Config, use_sample: bool = False) -> pd.DataFrame:
    """split.csv (or the sample's) with each image's absolute path."""
    raw = cfg.paths.path("raw")
    if use_sample:
        split_csv = cfg.paths.path("sample") / "split.csv"
        if not split_csv.exists():
            raise StageError(f"{split_csv} not found: run the sample stage first (use_sample=true)")
        split = read_csv_of_strings(split_csv)
        split["path"] = [str(cfg.paths.path("sample") / p) for p in split["path"]]
    else:
        split_csv, train_index = cfg.paths.path("split_csv"), raw / TRAIN_INDEX
        for path in (split_csv, train_index):
            if not path.exists():
                raise StageError(f"{path} not found: run the ingest and split stages first")
        split = read_csv_of_strings(split_csv)
        paths = read_csv_of_strings(train_index).set_index("id")["path"]
        missing = ~split["id"].isin(paths.index)
        if missing.any():
            raise StageError(f"{split_csv}: image {split['id'][missing].iloc[0]!r} is not in {train_index}")
        split["path"] = [str(raw / p) for p in paths.loc[split["id"]]]
    return split


@dataclass(frozen=True)
class ImageTable:
    """Images of one split: ids, absolute paths and class indices (-1 for test images)."""

    ids: list[str]
    paths: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, classes: Sequence[str]) -> ImageTable:
        labels = label_indices(frame["label"].tolist(), classes, "split", allow_missing=True)
        return cls(frame["id"].tolist(), frame["path"].tolist(), labels)

    def subset(self, rows: np.ndarray) -> ImageTable:
        rows = np.asarray(rows, dtype=np.int64)
        return ImageTable([self.ids[i] for i in rows], [self.paths[i] for i in rows], self.labels[rows])


def read_tables(cfg: Config, use_sample: bool, fold: int | None = None) -> dict[str, ImageTable]:
    """train (split train rows), valid (split valid rows) and test, as the features stage reads them;
    with ``fold``, fold model ``fold``'s train and held-out (valid) rows."""
    classes = read_competition(cfg.paths.path("raw")).classes
    frames = read_image_tables(cfg, use_sample, fold)
    return {name: ImageTable.from_frame(frame, classes) for name, frame in frames.items()}


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]
