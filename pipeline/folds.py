"""Folds and held-out groups: which labelled images validate which model.

Frames of one group (State Farm: a driver) are near-duplicates, so validation holds out whole
groups and K-fold CV groups by them (stratified by class); without a group column every image is
its own group.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from pipeline.errors import StageError

MAX_DRAWS = 1000  # random group subsets tried before giving up on covering every class


def n_valid_groups(valid_groups: float, n_groups: int) -> int:
    """A count (>= 1) or a fraction (< 1) of groups; always leaves at least one train group."""
    n = int(valid_groups) if valid_groups >= 1 else max(1, round(valid_groups * n_groups))
    if n >= n_groups:
        raise StageError(f"split.valid_groups={valid_groups} holds out {n} of {n_groups} groups: "
                         "at least one group must stay in train")
    return n


def choose_valid_groups(table: pd.DataFrame, n_valid: int, seed: int) -> list[str]:
    """A seeded random set of ``n_valid`` groups whose images cover every class present."""
    classes_of = table.groupby("group")["label"].agg(set)
    groups = sorted(classes_of.index)
    wanted = set(table["label"])
    rng = np.random.default_rng(seed)
    for _ in range(MAX_DRAWS):
        chosen = sorted(rng.choice(groups, size=n_valid, replace=False).tolist())
        if set().union(*(classes_of[g] for g in chosen)) == wanted:
            return chosen
    raise StageError(f"no set of {n_valid} validation groups covers all {len(wanted)} classes "
                     f"after {MAX_DRAWS} draws; raise split.valid_groups")


def choose_valid_images(table: pd.DataFrame, fraction: float, seed: int) -> list[str]:
    """Without groups: ``fraction`` of each class's images (at least one where a class has two or more)."""
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for _label, ids in sorted(table.groupby("label")["id"]):
        ids = sorted(ids)
        n = min(len(ids) - 1, max(1, round(fraction * len(ids))))
        chosen += rng.choice(ids, size=n, replace=False).tolist() if n > 0 else []
    return sorted(chosen)


def assign_folds(table: pd.DataFrame, n_folds: int, seed: int, grouped: bool = True) -> np.ndarray:
    """Class-stratified folds, every row in one: grouped (no group in two folds) with a group column,
    else over images (scikit-learn's StratifiedKFold)."""
    folds = np.full(len(table), -1, dtype=np.int64)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": expected for rare classes
        warnings.simplefilter("ignore", UserWarning)
        if grouped:
            n_groups = table["group"].nunique()
            if n_groups < n_folds:
                raise StageError(f"split.n_folds={n_folds} needs at least that many groups, have {n_groups}")
            splits = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(
                table, table["label"], groups=table["group"])
        else:
            smallest = int(table["label"].value_counts().min())
            if smallest < n_folds:
                raise StageError(f"split.n_folds={n_folds}: the rarest class has only {smallest} training images")
            splits = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed).split(table, table["label"])
        try:
            for fold, (_, held) in enumerate(splits):
                folds[held] = fold
        except ValueError as err:  # e.g. every class has fewer images than folds
            raise StageError(f"split.n_folds={n_folds} cannot be met: {err}") from None
    return folds


def held_out_mask(split: pd.DataFrame, fold: int, validation: str) -> np.ndarray:
    """Rows of ``split.csv`` that fold model ``fold`` never trains on and predicts out of fold: cv,
    the rows of fold ``fold``; holdout (one fold model), the validation split."""
    if validation == "holdout":
        return (split["split"] == "valid").to_numpy()
    folds = pd.to_numeric(split["fold"]).to_numpy()
    if fold not in set(folds.tolist()):
        raise StageError(f"fold {fold} has no rows in the split (folds: {sorted(set(folds.tolist()))}): "
                         "rerun the split stage")
    return folds == fold


def nested_folds(folds: np.ndarray, groups: np.ndarray, validation: str, n_folds: int, seed: int | None = None) -> np.ndarray | None:
    """The folds a decision fitted on out-of-fold rows is cross-fitted over for its honest estimate:
    cv, the K folds themselves; holdout, folds over the validation groups."""
    if validation == "cv":
        return np.asarray(folds) if len(np.unique(folds)) > 1 else None
    return group_folds(np.asarray(groups), n_folds, seed)


def group_folds(groups: np.ndarray, n_folds: int, seed: int | None = None) -> np.ndarray | None:
    """Fold per row with whole groups per fold, groups dealt round-robin (sorted, or shuffled with
    ``seed``); None for fewer than two groups. The cross-fitted estimates of ensemble and calibrate."""
    unique = np.unique(groups)
    if len(unique) < 2:
        return None
    order = unique if seed is None else np.random.default_rng(seed).permutation(unique)
    fold_of = {g: i % min(n_folds, len(unique)) for i, g in enumerate(order.tolist())}
    return np.array([fold_of[g] for g in np.asarray(groups).tolist()])
