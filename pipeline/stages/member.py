"""``member`` stage: one ensemble member, trained with its own seed and, by default, without one
driver fold (bagging over drivers), so members disagree where a single model is unsure. One DVC stage
per member id (``member@<id>``, a ``foreach`` over ``ensemble.members``), so each member is cached on
its own and adding one trains only that one.

What a member is follows ``ensemble.member_model``:

- ``finetune`` (default): the CNN fine-tuned from the head stage's weights exactly as the finetune
  stage does (``pipeline.recipes.fine_tune``: its settings and DDP; under DVC a killed member starts
  over, since its outputs are not persistent: see dvc.yaml), with seed
  ``finetune.seed + 1 + m``. Test-time augmentation happens here, since it needs the CNN:
  ``ensemble.tta`` augmented passes of every valid and test image (the features stage's copies
  1..tta, never flipped) averaged with the plain pass, kept only when that lowers this member's
  validation log loss. Outputs ``models/member/<m>/`` (``model.pt`` as the finetune stage writes it,
  checkpoints, ``run.json``, ``logs/``).
- ``head``: a dense head on the cached conv features (``pipeline.recipes.fit_head``), seed ``head.seed + 1 + m``:
  seconds on a CPU, but weaker than and correlated with the fine-tuned model. Writes ``head.pt``;
  its predictions are plain (the ensemble stage adds TTA from the feature cache).

Member ``m`` trains on the train images outside driver fold ``m % split.n_folds`` (all of them when
``ensemble.hold_out_fold`` is off, or when that fold holds every train driver). Validation (early
stopping, checkpoint) is the held-out validation drivers, as everywhere.

Outputs also ``data/predictions/member/<m>/{valid,test}.csv`` and ``reports/stages/member@<m>.json``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import AugmentConfig, Config, item_stage
from pipeline.errors import StageError
from pipeline.featurecache import FeatureSplit, load_meta, load_split
from pipeline.metrics import (
    evaluate,
    keep_tta_if_better,
    read_hidden_labels,
    write_predictions,
    write_stage_metrics,
)
from pipeline.recipes import (
    HEAD_FILE,
    FineTuned,
    fine_tune,
    fit_head,
    head_meta,
    predict_and_score,
    training_figures,
)
from pipeline.tables import ImageTable, read_tables
from pipeline.training import MODEL_FILE, quiet_training, save_network

STAGE = "member"


# ---------------------------------------------------------------------------- naming


def stage_name(member: int) -> str:
    return item_stage(STAGE, member)


def member_seed(cfg: Config, member: int) -> int:
    """Never the seed of the stage the member copies (finetune or head), so members differ from it."""
    section = cfg.finetune if cfg.ensemble.member_model == "finetune" else cfg.head
    return section.seed + 1 + member


def held_out_fold(cfg: Config, member: int) -> int | None:
    return member % cfg.split.n_folds if cfg.ensemble.hold_out_fold else None


# ---------------------------------------------------------------------------- train rows


def read_train_folds(split_csv: Path) -> pd.DataFrame:
    """id, group, fold of every train-split image."""
    if not split_csv.exists():
        raise StageError(f"{split_csv} not found: run the split stage first")
    split = pd.read_csv(split_csv, dtype={"id": str, "group": str, "split": str}, keep_default_na=False)
    return split.loc[split["split"] == "train", ["id", "group", "fold"]]


def images_outside_fold(folds: pd.DataFrame, fold: int | None) -> set[str]:
    """Train images not in ``fold``; all of them when ``fold`` is None or would leave none."""
    kept = folds if fold is None else folds[folds["fold"] != fold]
    return set((kept if len(kept) else folds)["id"])


def subset_split(split: FeatureSplit, imgs: set[str]) -> FeatureSplit:
    """The rows (every copy) of ``imgs``, renumbered so row ``i`` is ``features[i]`` again."""
    keep = split.index["id"].isin(imgs).to_numpy()
    index = split.index.loc[keep].reset_index(drop=True)
    index["row"] = np.arange(len(index))
    return FeatureSplit(split.name, index, split.features[keep], split.copies)


# ---------------------------------------------------------------------------- training


def member_config(cfg: Config, member: int) -> Config:
    """The config the head trainer sees: the head section with this member's seed."""
    return cfg.model_copy(update={"head": cfg.head.model_copy(update={"seed": member_seed(cfg, member)})})


def train_head_member(cfg: Config, member: int, folds: pd.DataFrame, fold: int | None) -> dict[str, Any]:
    """A dense head on the cached features of the member's train images; plain predictions."""
    quiet_training()
    features_dir = cfg.paths.path("features")
    features_meta = load_meta(features_dir)
    train, valid, test = (load_split(features_dir, s) for s in ("train", "valid", "test"))
    kept = images_outside_fold(folds[folds["id"].isin(train.index["id"])], fold)
    member_cfg = member_config(cfg, member)
    out_dir = cfg.paths.member_models(member)
    classes = features_meta["classes"]
    head, facts = fit_head(member_cfg, subset_split(train, kept), valid, out_dir, classes, label=stage_name(member))
    meta = {**head_meta(member_cfg, features_meta, int(train.features.shape[1])),
            "member": member, "seed": member_seed(cfg, member), "held_out_fold": fold}
    figures = predict_and_score(cfg, head, valid, test, cfg.paths.member_predictions(member), classes)
    save_network(out_dir / HEAD_FILE, head, meta)
    return {**figures, **facts, "n_train_images": len(kept), "n_train_groups": group_count(folds, kept)}


def tta_predictions(fitted: FineTuned, tables: dict[str, ImageTable], passes: int, augment: AugmentConfig,
                    seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Valid and test probabilities: the plain pass, or its mean with ``passes`` augmented passes
    when that lowers validation log loss (test is augmented only then)."""
    def averaged(table: ImageTable, plain: np.ndarray) -> np.ndarray:
        return np.mean([plain, *(fitted.predict(table, k, augment, seed) for k in range(1, passes + 1))], axis=0)

    valid, test = fitted.predict(tables["valid"]), fitted.predict(tables["test"])
    return keep_tta_if_better(tables["valid"].labels, valid, test,
                              (lambda: averaged(tables["valid"], valid)) if passes else None,
                              lambda: averaged(tables["test"], test))


def train_finetuned_member(cfg: Config, member: int, folds: pd.DataFrame, fold: int | None) -> dict[str, Any]:
    """The CNN fine-tuned like the finetune stage with this member's seed and train drivers; TTA
    predictions. ``{}`` on DDP ranks other than 0, which write nothing."""
    quiet_training()
    tables = read_tables(cfg, cfg.finetune.use_sample)
    train = tables["train"]
    kept = images_outside_fold(folds[folds["id"].isin(train.ids)], fold)
    tables["train"] = train.subset(np.flatnonzero(np.isin(train.ids, sorted(kept))))
    settings = cfg.finetune.model_copy(update={"seed": member_seed(cfg, member)})
    out_dir = cfg.paths.member_models(member)
    fitted = fine_tune(cfg, settings, tables, out_dir, modules=[sys.modules[__name__]], label=stage_name(member))
    valid, test, tta = tta_predictions(fitted, tables, cfg.ensemble.tta, cfg.augment, cfg.features.seed)
    if not fitted.outcome.is_global_zero:
        return {}
    save_network(out_dir / MODEL_FILE, fitted.outcome.network,
                 {**fitted.meta, "stage": stage_name(member), "seed": settings.seed, "held_out_fold": fold})
    pred_dir = cfg.paths.member_predictions(member)
    classes = fitted.meta["classes"]
    figures = evaluate(valid, tables["valid"].labels, tables["test"].ids, test,
                       read_hidden_labels(cfg.paths.path("hidden"), classes))
    write_predictions(pred_dir / "valid.csv", tables["valid"].ids, valid, classes)
    write_predictions(pred_dir / "test.csv", tables["test"].ids, test, classes)
    return {**figures, **tta, **training_figures(fitted, len(kept)), "n_train_groups": group_count(folds, kept)}


def group_count(folds: pd.DataFrame, imgs: set[str]) -> int:
    return int(folds.loc[folds["id"].isin(imgs), "group"].nunique())


TRAINERS = {"finetune": train_finetuned_member, "head": train_head_member}


def run_member(cfg: Config, member: int) -> dict[str, Any]:
    """Train member ``member``, write its model, predictions and figures; return the figures."""
    start = time.perf_counter()
    folds = read_train_folds(cfg.paths.path("split_csv"))
    fold = held_out_fold(cfg, member)
    figures = TRAINERS[cfg.ensemble.member_model](cfg, member, folds, fold)
    if not figures:  # a DDP rank other than 0
        return {}
    figures.update({"member": member, "model": cfg.ensemble.member_model, "seed": member_seed(cfg, member),
                    "held_out_fold": fold, "seconds": round(time.perf_counter() - start, 3)})
    write_stage_metrics(cfg.paths.stage_metrics_file(stage_name(member)), figures)
    return figures


def run(cfg: Config, member: int | None = None) -> dict[str, Any]:
    """One member (the DVC ``member@<id>`` stages), or every member of ``ensemble.members`` in turn."""
    if member is not None:
        if member not in cfg.ensemble.members:
            raise StageError(f"member {member} is not in ensemble.members {cfg.ensemble.members}")
        return run_member(cfg, member)
    return {stage_name(m): run_member(cfg, m) for m in cfg.ensemble.members}
