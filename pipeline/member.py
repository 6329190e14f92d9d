"""``member`` stage: one ensemble member, a dense head trained on the cached conv features with its own
seed and, by default, without one driver fold (bagging over drivers), so members disagree where a
single head is unsure. One DVC stage per member id (``member@<id>``, a ``foreach`` over
``ensemble.members``), so each member is cached on its own and adding one trains only that one.

Member ``m`` trains with seed ``head.seed + 1 + m`` (never the head stage's own seed) on every cached
copy of the train images outside driver fold ``m % split.n_folds`` (all of them when
``ensemble.hold_out_fold`` is off, or when that fold holds every train driver), using the head
stage's model, data module and trainer (``pipeline.head``). Validation (early stopping, checkpoint)
is the held-out validation drivers, as for the head.

Outputs: ``models/member/<m>/`` (``head.pt`` as ``pipeline.head.load_head`` reads it, Lightning
checkpoints, ``logs/metrics.csv``), ``data/predictions/member/<m>/{valid,test}.csv`` (plain, no TTA:
the ensemble stage adds TTA) and ``reports/stages/member@<m>.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Config
from pipeline.errors import StageError
from pipeline.features import FeatureSplit, load_meta, load_split
from pipeline.head import HEAD_FILE, fit_head, head_meta, predict_and_score, quiet_lightning, save_head
from pipeline.metrics import write_stage_metrics

STAGE = "member"


# ---------------------------------------------------------------------------- naming


def stage_name(member: int) -> str:
    """The DVC name of member ``member``'s stage (foreach items are ``<stage>@<item>``)."""
    return f"{STAGE}@{member}"


def model_dir(cfg: Config, member: int) -> Path:
    return cfg.paths.path("models") / STAGE / str(member)


def predictions_dir(cfg: Config, member: int) -> Path:
    return cfg.paths.path("predictions") / STAGE / str(member)


def member_seed(cfg: Config, member: int) -> int:
    return cfg.head.seed + 1 + member


def held_out_fold(cfg: Config, member: int) -> int | None:
    return member % cfg.split.n_folds if cfg.ensemble.hold_out_fold else None


# ---------------------------------------------------------------------------- train rows


def read_train_folds(split_csv: Path) -> pd.DataFrame:
    """img, subject, fold of every train-split image."""
    if not split_csv.exists():
        raise StageError(f"{split_csv} not found: run the split stage first")
    split = pd.read_csv(split_csv, dtype={"img": str, "subject": str, "split": str})
    return split.loc[split["split"] == "train", ["img", "subject", "fold"]]


def images_outside_fold(folds: pd.DataFrame, fold: int | None) -> set[str]:
    """Train images not in ``fold``; all of them when ``fold`` is None or would leave none."""
    kept = folds if fold is None else folds[folds["fold"] != fold]
    return set((kept if len(kept) else folds)["img"])


def subset_split(split: FeatureSplit, imgs: set[str]) -> FeatureSplit:
    """The rows (every copy) of ``imgs``, renumbered so row ``i`` is ``features[i]`` again."""
    keep = split.index["img"].isin(imgs).to_numpy()
    index = split.index.loc[keep].reset_index(drop=True)
    index["row"] = np.arange(len(index))
    return FeatureSplit(split.name, index, split.features[keep], split.copies)


# ---------------------------------------------------------------------------- training


def member_config(cfg: Config, member: int) -> Config:
    """The config the head trainer sees: the head section with this member's seed."""
    return cfg.model_copy(update={"head": cfg.head.model_copy(update={"seed": member_seed(cfg, member)})})


def run_member(cfg: Config, member: int) -> dict[str, Any]:
    """Train member ``member``, write its head, plain predictions and figures; return the figures."""
    start = time.perf_counter()
    quiet_lightning()
    features_dir = cfg.paths.path("features")
    features_meta = load_meta(features_dir)
    train, valid, test = (load_split(features_dir, s) for s in ("train", "valid", "test"))
    folds = read_train_folds(cfg.paths.path("split_csv"))
    fold = held_out_fold(cfg, member)
    kept = images_outside_fold(folds[folds["img"].isin(train.index["img"])], fold)
    member_train = subset_split(train, kept)

    member_cfg = member_config(cfg, member)
    out_dir = model_dir(cfg, member)
    head, facts = fit_head(member_cfg, member_train, valid, out_dir)
    meta = {**head_meta(member_cfg, features_meta, int(train.features.shape[1])),
            "member": member, "seed": member_seed(cfg, member), "held_out_fold": fold}
    save_head(out_dir / HEAD_FILE, head, meta)

    figures = predict_and_score(cfg, head, valid, test, predictions_dir(cfg, member))
    train_drivers = folds.loc[folds["img"].isin(kept), "subject"].nunique()
    figures.update({"member": member, "seed": member_seed(cfg, member), "held_out_fold": fold,
                    "n_train_images": len(kept), "n_train_drivers": int(train_drivers), **facts,
                    "seconds": round(time.perf_counter() - start, 3)})
    write_stage_metrics(cfg.paths.stage_metrics_file(stage_name(member)), figures)
    return figures


def run(cfg: Config, member: int | None = None) -> dict[str, Any]:
    """One member (the DVC ``member@<id>`` stages), or every member of ``ensemble.members`` in turn."""
    if member is not None:
        if member not in cfg.ensemble.members:
            raise StageError(f"member {member} is not in ensemble.members {cfg.ensemble.members}")
        return run_member(cfg, member)
    return {stage_name(m): run_member(cfg, m) for m in cfg.ensemble.members}


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline member [--id M]`` (the CLI passes ``--id`` to ``run`` as ``member``)."""
    from pipeline.cli import main as cli_main

    raise SystemExit(cli_main(["member", *(argv or [])]))
