"""Ensemble members (the ``member`` stage): each member's seed, and in holdout mode the fold of train
drivers it leaves out (bagging over drivers, the only source of diversity besides the seed with a
single fold)."""

from __future__ import annotations

import pandas as pd

from pipeline.config import Config
from pipeline.training.folds import read_split_csv


def member_seed(cfg: Config, member: int) -> int:
    """Never the seed of the stage the member copies (finetune or head), so members differ from it."""
    section = cfg.finetune if cfg.ensemble.member_model == "finetune" else cfg.head
    return section.seed + 1 + member


def bagged_fold(cfg: Config, member: int) -> int | None:
    """Holdout mode only: the fold of train drivers member ``member`` leaves out (bagging)."""
    if cfg.split.validation == "holdout" and cfg.ensemble.hold_out_fold:
        return member % cfg.split.n_folds
    return None


# ---------------------------------------------------------------------------- train rows


def kept_train_ids(cfg: Config, train_ids: list[str], member: int) -> set[str]:
    """The member's train images: the fold model's train rows, less the bagged fold (holdout mode);
    all of them when that would leave none."""
    fold = bagged_fold(cfg, member)
    if fold is None:
        return set(train_ids)
    split = read_split_csv(cfg.paths.path("split_csv"))
    dropped = set(split.loc[pd.to_numeric(split["fold"]) == fold, "id"])
    kept = set(train_ids) - dropped
    return kept or set(train_ids)


def group_count(cfg: Config, ids: set[str]) -> int:
    split = read_split_csv(cfg.paths.path("split_csv"))
    return int(split.loc[split["id"].isin(ids), "group"].nunique())


# ---------------------------------------------------------------------------- training


def member_config(cfg: Config, member: int) -> Config:
    """The config the head trainer sees: the head section with this member's seed."""
    return cfg.model_copy(update={"head": cfg.head.model_copy(update={"seed": member_seed(cfg, member)})})
