"""The labelled and test images every training stage reads: train and valid rows of the split (or of
the sample), test rows of the ingest index, with absolute paths and class indices."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.data import class_index
from pipeline.errors import StageError


def read_image_tables(cfg: Config, use_sample: bool = False) -> dict[str, pd.DataFrame]:
    """img, path, classname per split. Train/valid come from the split (or the sample's split when
    ``use_sample``), test from data/raw/test_index.csv; paths are absolute."""
    raw = cfg.paths.path("raw")
    test_index = raw / "test_index.csv"
    if use_sample:
        split_csv = cfg.paths.path("sample") / "split.csv"
        if not split_csv.exists():
            raise StageError(f"{split_csv} not found: run the sample stage first (use_sample=true)")
        split = pd.read_csv(split_csv, dtype={"img": str, "classname": str, "split": str})
        sample_dir = cfg.paths.path("sample")
        split["path"] = [str(sample_dir / s / c / i) for s, c, i in zip(split["split"], split["classname"], split["img"], strict=True)]
    else:
        split_csv, train_index = cfg.paths.path("split_csv"), raw / "train_index.csv"
        for path in (split_csv, train_index):
            if not path.exists():
                raise StageError(f"{path} not found: run the ingest and split stages first")
        split = pd.read_csv(split_csv, dtype={"img": str, "classname": str, "split": str})
        paths = pd.read_csv(train_index, dtype=str).set_index("img")["path"]
        missing = ~split["img"].isin(paths.index)
        if missing.any():
            raise StageError(f"{split_csv}: image {split['img'][missing].iloc[0]!r} is not in {train_index}")
        split["path"] = [str(raw / p) for p in paths.loc[split["img"]]]
    if not test_index.exists():
        raise StageError(f"{test_index} not found: run the ingest stage first")
    test = pd.read_csv(test_index, dtype=str)
    test["path"] = [str(raw / p) for p in test["path"]]
    test["classname"] = ""
    cols = ["img", "path", "classname"]
    return {
        "valid": split.loc[split["split"] == "valid", cols].reset_index(drop=True),
        "test": test[cols].reset_index(drop=True),
        "train": split.loc[split["split"] == "train", cols].reset_index(drop=True),
    }



@dataclass(frozen=True)
class ImageTable:
    """Images of one split: names, absolute paths and class indices (-1 for test images)."""

    imgs: list[str]
    paths: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.imgs)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> ImageTable:
        return cls(frame["img"].tolist(), frame["path"].tolist(), class_index(frame["classname"].tolist()))

    def subset(self, rows: np.ndarray) -> ImageTable:
        rows = np.asarray(rows, dtype=np.int64)
        return ImageTable([self.imgs[i] for i in rows], [self.paths[i] for i in rows], self.labels[rows])


def read_tables(cfg: Config, use_sample: bool) -> dict[str, ImageTable]:
    """train (split train rows), valid (split valid rows) and test, as the features stage reads them."""
    frames = read_image_tables(cfg, use_sample)
    return {name: ImageTable.from_frame(frame) for name, frame in frames.items()}


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]

