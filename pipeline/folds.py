"""Folds and held-out groups: which labelled images validate which model.

Frames of one group (State Farm: a driver) are near-duplicates, so validation holds out whole
groups and K-fold CV groups by them (stratified by class); without a group column every image is
its own group.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from pipeline.errors import StageError

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



def group_folds(groups: np.ndarray, n_folds: int, seed: int | None = None) -> np.ndarray | None:
    """Fold per row with whole groups per fold, groups dealt round-robin (sorted, or shuffled with
    ``seed``); None for fewer than two groups. The cross-fitted estimates of ensemble and calibrate."""
    unique = np.unique(groups)
    if len(unique) < 2:
        return None
    order = unique if seed is None else np.random.default_rng(seed).permutation(unique)
    fold_of = {g: i % min(n_folds, len(unique)) for i, g in enumerate(order.tolist())}
    return np.array([fold_of[g] for g in np.asarray(groups).tolist()])
