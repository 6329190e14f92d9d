"""Running a per-fold stage for one fold (a DVC ``foreach``/``matrix`` item) or for all of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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
