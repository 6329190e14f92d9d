"""``split`` stage: hold out whole drivers for validation and assign driver-grouped folds.

Frames are video frames: an image's nearest neighbour is the same driver ~100% of the time, so a
random split leaks (98-99% validation accuracy, useless). Validation therefore holds out whole
drivers, and the K folds used later for ensembling group by driver too (stratified by class).
"""

from __future__ import annotations

import time
import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.config import CLASSES, Config, SplitConfig
from pipeline.errors import BadInputError, StageError
from pipeline.io import atomic_write_csv
from pipeline.metrics import write_stage_metrics

SPLIT_COLUMNS = ["img", "subject", "classname", "split", "fold"]
MAX_DRAWS = 1000  # random driver subsets tried before giving up on covering every class


def n_valid_drivers(valid_drivers: float, n_drivers: int) -> int:
    """A count (>= 1) or a fraction (< 1) of drivers; always leaves at least one train driver."""
    n = int(valid_drivers) if valid_drivers >= 1 else max(1, round(valid_drivers * n_drivers))
    if n >= n_drivers:
        raise StageError(f"split.valid_drivers={valid_drivers} holds out {n} of {n_drivers} drivers: "
                         "at least one driver must stay in train")
    return n


def choose_valid_drivers(table: pd.DataFrame, n_valid: int, seed: int) -> list[str]:
    """A seeded random set of ``n_valid`` drivers whose images cover every class present."""
    classes_of = table.groupby("subject")["classname"].agg(set)
    drivers = sorted(classes_of.index)
    wanted = set(table["classname"])
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DRAWS):
        chosen = sorted(rng.choice(drivers, size=n_valid, replace=False).tolist())
        if set().union(*(classes_of[d] for d in chosen)) == wanted:
            return chosen
    raise StageError(f"no set of {n_valid} validation drivers covers all {len(wanted)} classes "
                     f"after {MAX_DRAWS} draws; raise split.valid_drivers")


def assign_folds(table: pd.DataFrame, n_folds: int, seed: int) -> np.ndarray:
    """Driver-grouped, class-stratified folds: every row one fold, no driver in two folds."""
    n_drivers = table["subject"].nunique()
    if n_drivers < n_folds:
        raise StageError(f"split.n_folds={n_folds} needs at least that many drivers, have {n_drivers}")
    folds = np.full(len(table), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": expected for rare classes
        warnings.simplefilter("ignore", UserWarning)
        for fold, (_, held) in enumerate(splitter.split(table, table["classname"], groups=table["subject"])):
            folds[held] = fold
    return folds


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


def main() -> None:
    from pipeline.cli import main as cli_main

    raise SystemExit(cli_main(["split"]))
