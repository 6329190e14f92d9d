"""Fold models: running a per-fold stage for one fold (a DVC ``foreach``/``matrix`` item) or for all
of them, and what a fold model's training may look at."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config, item_stage
from pipeline.errors import StageError


def check_fold(cfg: Config, fold: int) -> None:
    if fold not in cfg.split.fold_ids:
        raise StageError(f"fold {fold} is not one of split.fold_ids {cfg.split.fold_ids} "
                         f"(split.validation={cfg.split.validation}, n_folds={cfg.split.n_folds})")


def run_folds(cfg: Config, stage: str, run_fold: Callable[[Config, int], dict[str, Any]],
              fold: int | None = None) -> dict[str, Any]:
    """``run_fold(cfg, fold)`` for one fold, or for each fold in turn (figures keyed by DVC name)."""
    if fold is not None:
        check_fold(cfg, fold)
        return run_fold(cfg, fold)
    return {item_stage(stage, f): run_fold(cfg, f) for f in cfg.split.fold_ids}


def monitors_held_out(cfg: Config) -> bool:
    """Whether training may watch its held-out rows (early stopping, best checkpoint): in holdout mode
    yes (the validation split, as fast.ai's Practical Deep Learning for Coders, part 1 (2017), watches
    it); in cv mode never, so out-of-fold predictions stay honest: fold models train exactly
    ``max_epochs`` and keep the last weights."""
    return cfg.split.validation == "holdout"


def read_split_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise StageError(f"{path} not found: run the split stage first")
    return pd.read_csv(path, dtype={"id": str, "label": str, "group": str, "split": str}, keep_default_na=False)
