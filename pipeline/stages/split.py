"""``split`` stage: hold out whole drivers for validation and assign driver-grouped folds.

Frames are video frames: an image's nearest neighbour is the same driver ~100% of the time, so a
random split leaks (98-99% validation accuracy, useless). Validation therefore holds out whole
drivers, and the K folds used later for ensembling group by driver too (stratified by class).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from pipeline.config import CLASSES, Config, SplitConfig
from pipeline.errors import BadInputError, StageError
from pipeline.folds import assign_folds, choose_valid_drivers, n_valid_drivers
from pipeline.io import atomic_write_csv
from pipeline.metrics import write_stage_metrics

SPLIT_COLUMNS = ["img", "subject", "classname", "split", "fold"]
def make_split(table: pd.DataFrame, cfg: SplitConfig) -> pd.DataFrame:
    """The split table (img, subject, classname, split, fold) for a train index table."""
    table = table.sort_values("img", kind="stable").reset_index(drop=True)
    valid = choose_valid_drivers(table, n_valid_drivers(cfg.valid_drivers, table["subject"].nunique()), cfg.seed)
    out = table[["img", "subject", "classname"]].copy()
    out["split"] = np.where(out["subject"].isin(valid), "valid", "train")
    out["fold"] = assign_folds(out, cfg.n_folds, cfg.seed)
    return out[SPLIT_COLUMNS]


def read_train_index(cfg: Config) -> pd.DataFrame:
    path = cfg.paths.path("raw") / "train_index.csv"
    if not path.exists():
        raise StageError(f"{path} not found: run the ingest stage first")
    table = pd.read_csv(path, dtype=str)
    missing = {"img", "subject", "classname"} - set(table.columns)
    if missing:
        raise BadInputError(path, f"missing columns {sorted(missing)}", row=1)
    unknown = ~table["classname"].isin(CLASSES)
    if unknown.any():
        i = int(np.flatnonzero(unknown)[0])
        raise BadInputError(path, f"unknown class {table['classname'].iloc[i]!r}", row=i + 2)
    return table


def split_figures(split: pd.DataFrame) -> dict:
    valid = split[split["split"] == "valid"]
    return {
        "n_train": int((split["split"] == "train").sum()),
        "n_valid": len(valid),
        "valid_drivers": sorted(valid["subject"].unique().tolist()),
        "n_drivers": int(split["subject"].nunique()),
        "fold_sizes": split["fold"].value_counts().sort_index().astype(int).tolist(),
    }


def run(cfg: Config) -> dict:
    start = time.perf_counter()
    split = make_split(read_train_index(cfg), cfg.split)
    atomic_write_csv(cfg.paths.path("split_csv"), split)
    figures = split_figures(split) | {"seconds": round(time.perf_counter() - start, 3)}
    write_stage_metrics(cfg.paths.stage_metrics_file("split"), figures)
    return figures
