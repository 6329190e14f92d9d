"""``split`` stage: assign K folds grouped like the test split (``split.validation: cv``, every
labelled image in ``split`` "train", each fold held out by its own fold models) or, in holdout mode,
also hold out one validation set.

With a group column (State Farm: drivers) whole groups are held out: frames are video frames, an
image's nearest neighbour is the same driver ~100% of the time, so a random split leaks (98-99%
validation accuracy, useless); the K folds used later group by it too (stratified by class). Without
one, ``split.valid_fraction`` of each class's images are held out and the folds are stratified over
images; every image is then its own group in ``split.csv``, and the report says validation is per
image.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from pipeline.competition import TRAIN_INDEX, label_indices, read_competition
from pipeline.config import Config, SplitConfig
from pipeline.errors import BadInputError, StageError
from pipeline.folds import assign_folds, choose_valid_groups, choose_valid_images, n_valid_groups
from pipeline.io import atomic_write_csv
from pipeline.metrics import write_stage_metrics

SPLIT_COLUMNS = ["id", "label", "group", "split", "fold"]


def make_split(table: pd.DataFrame, cfg: SplitConfig, grouped: bool = True) -> pd.DataFrame:
    """The split table (id, label, group, split, fold) for a train index table (id, label, group)."""
    table = table.sort_values("id", kind="stable").reset_index(drop=True)
    out = table[["id", "label", "group"]].copy()
    if not grouped:
        out["group"] = out["id"]  # every image its own group: per-image validation and cross-fitting
    if cfg.validation == "cv":
        out["split"] = "train"  # nothing held out for good: each fold is held out by its own fold models
    elif grouped:
        valid = choose_valid_groups(out, n_valid_groups(cfg.valid_groups, out["group"].nunique()), cfg.seed)
        out["split"] = np.where(out["group"].isin(valid), "valid", "train")
    else:
        out["split"] = np.where(out["id"].isin(choose_valid_images(out, cfg.valid_fraction, cfg.seed)), "valid", "train")
    out["fold"] = assign_folds(out, cfg.n_folds, cfg.seed, grouped)
    return out[SPLIT_COLUMNS]


def read_train_index(cfg: Config, classes: tuple[str, ...]) -> pd.DataFrame:
    path = cfg.paths.path("raw") / TRAIN_INDEX
    if not path.exists():
        raise StageError(f"{path} not found: run the ingest stage first")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = {"id", "label", "group"} - set(table.columns)
    if missing:
        raise BadInputError(path, f"missing columns {sorted(missing)}: rerun the ingest stage", row=1)
    label_indices(table["label"].tolist(), classes, path)  # an unknown label names its row
    return table


def split_figures(split: pd.DataFrame, grouped: bool) -> dict:
    valid = split[split["split"] == "valid"]
    figures = {
        "n_train": int((split["split"] == "train").sum()),
        "n_valid": len(valid),
        "grouped": grouped,
        "fold_sizes": split["fold"].value_counts().sort_index().astype(int).tolist(),
    }
    if grouped:
        figures.update({"valid_groups": sorted(valid["group"].unique().tolist()), "n_groups": int(split["group"].nunique())})
    return figures


def run(cfg: Config) -> dict:
    start = time.perf_counter()
    competition = read_competition(cfg.paths.path("raw"))
    grouped = competition.has_groups
    split = make_split(read_train_index(cfg, competition.classes), cfg.split, grouped)
    atomic_write_csv(cfg.paths.path("split_csv"), split)
    figures = split_figures(split, grouped) | {"validation": cfg.split.validation, "seconds": round(time.perf_counter() - start, 3)}
    write_stage_metrics(cfg.paths.stage_metrics_file("split"), figures)
    return figures
