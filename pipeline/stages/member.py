"""``member`` stage: one ensemble member, trained once per fold with its own seed, so members
disagree where a single model is unsure. One DVC stage per (member, fold) (``member@<m>-<fold>``, a
``matrix`` over ``ensemble.members`` and ``split.fold_ids``), each cached and restorable on its own:
adding a member trains only its folds, and a fan-out sends each to its own worker.

What a member is follows ``ensemble.member_model``:

- ``finetune`` (default): the CNN fine-tuned from fold k's head exactly as the finetune stage does
  (``pipeline.training.fine_tuning.fine_tune``: its settings and DDP; under DVC a killed member starts over, since
  its outputs are not persistent: see dvc.yaml), with seed ``finetune.seed + 1 + m``. It predicts with
  test-time augmentation like every fine-tuned CNN of the chain (``pipeline.training.prediction.tta_predictions``).
- ``head``: a dense head on the cached conv features (``pipeline.training.head.fit_head``), seed
  ``head.seed + 1 + m``: seconds on a CPU, but weaker than and correlated with the fine-tuned model.

Fold model (m, k) trains on the rows outside fold k (cv) or on the train split (holdout; there, with
``ensemble.hold_out_fold``, also without the train drivers of fold ``m % split.n_folds``: bagging over
drivers, the only source of diversity besides the seed with a single fold; ``pipeline.training.members``).

Outputs ``models/member<m>/fold<k>/`` (``model.pt`` or ``head.pt``, checkpoints, ``run.json``, logs),
``data/predictions/folds/member<m>/<k>/{oof,test}.csv`` and ``reports/stages/member@<m>-<k>.json``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np

from pipeline.config import Config, item_stage, member_model_name
from pipeline.convfeatures.cache import load_meta
from pipeline.errors import StageError
from pipeline.metrics import (
    OOF_FILE,
    evaluate,
    read_hidden_labels,
    write_predictions,
    write_stage_metrics,
)
from pipeline.training import members
from pipeline.training.checkpoint import MODEL_FILE, save_network
from pipeline.training.fine_tuning import fine_tune, training_figures
from pipeline.training.folds import check_fold
from pipeline.training.head import HEAD_FILE, fit_head, fold_feature_splits, head_meta, predict_and_score
from pipeline.training.members import bagged_fold, group_count, kept_train_ids, member_config, member_seed
from pipeline.training.prediction import tta_predictions
from pipeline.training.tables import read_tables
from pipeline.training.trainer import quiet_training

STAGE = "member"


# ---------------------------------------------------------------------------- naming


def stage_name(member: int, fold: int) -> str:
    return item_stage(STAGE, member, fold)


def train_head_member(cfg: Config, member: int, fold: int) -> dict[str, Any]:
    """A dense head on the cached features of the member's train images; plain predictions."""
    quiet_training()
    features_meta = load_meta(cfg.paths.path("features"))
    train, held, test = fold_feature_splits(cfg, fold)
    kept = kept_train_ids(cfg, train.index["id"].unique().tolist(), member)
    member_cfg = member_config(cfg, member)
    name = member_model_name(member)
    out_dir = cfg.paths.fold_models(name, fold)
    classes = features_meta["classes"]
    head, facts = fit_head(member_cfg, train.subset(kept), held, out_dir, classes, label=stage_name(member, fold))
    meta = {**head_meta(member_cfg, features_meta, int(train.features.shape[1])),
            "member": member, "fold": fold, "seed": member_seed(cfg, member), "bagged_fold": bagged_fold(cfg, member)}
    figures = predict_and_score(cfg, head, held, test, cfg.paths.fold_predictions(name, fold), classes)
    save_network(out_dir / HEAD_FILE, head, meta)
    return {**figures, **facts, "n_train_images": len(kept), "n_train_groups": group_count(cfg, kept)}


def train_finetuned_member(cfg: Config, member: int, fold: int) -> dict[str, Any]:
    """The CNN fine-tuned like the finetune stage with this member's seed and train rows; TTA
    predictions (``prediction.tta_predictions``). ``{}`` on DDP ranks other than 0, which write nothing."""
    quiet_training()
    tables = read_tables(cfg, cfg.finetune.use_sample, fold)
    train = tables["train"]
    kept = kept_train_ids(cfg, train.ids, member)
    tables["train"] = train.subset(np.flatnonzero(np.isin(train.ids, sorted(kept))))
    settings = cfg.finetune.model_copy(update={"seed": member_seed(cfg, member)})
    name = member_model_name(member)
    out_dir = cfg.paths.fold_models(name, fold)
    fitted = fine_tune(cfg, settings, tables, out_dir, fold, modules=[sys.modules[__name__], members], label=stage_name(member, fold))
    valid, test, tta = tta_predictions(cfg, fitted, tables["valid"], tables["test"])
    if not fitted.outcome.is_global_zero:
        return {}
    save_network(out_dir / MODEL_FILE, fitted.outcome.network,
                 {**fitted.meta, "stage": stage_name(member, fold), "seed": settings.seed, "fold": fold,
                  "bagged_fold": bagged_fold(cfg, member)})
    pred_dir = cfg.paths.fold_predictions(name, fold)
    classes = fitted.meta["classes"]
    figures = evaluate(valid, tables["valid"].labels, tables["test"].ids, test,
                       read_hidden_labels(cfg.paths.path("hidden"), classes))
    write_predictions(pred_dir / OOF_FILE, tables["valid"].ids, valid, classes)
    write_predictions(pred_dir / "test.csv", tables["test"].ids, test, classes)
    return {**figures, **tta, **training_figures(fitted, len(kept)), "n_train_groups": group_count(cfg, kept)}


TRAINERS = {"finetune": train_finetuned_member, "head": train_head_member}


def run_member(cfg: Config, member: int, fold: int) -> dict[str, Any]:
    """Train member ``member`` for fold ``fold``, write its model, predictions and figures."""
    start = time.perf_counter()
    check_fold(cfg, fold)
    figures = TRAINERS[cfg.ensemble.member_model](cfg, member, fold)
    if not figures:  # a DDP rank other than 0
        return {}
    figures.update({"member": member, "fold": fold, "model": cfg.ensemble.member_model, "seed": member_seed(cfg, member),
                    "bagged_fold": bagged_fold(cfg, member), "seconds": round(time.perf_counter() - start, 3)})
    write_stage_metrics(cfg.paths.stage_metrics_file(stage_name(member, fold)), figures)
    return figures


def run(cfg: Config, member: int | None = None, fold: int | None = None) -> dict[str, Any]:
    """One (member, fold) (the DVC ``member@<m>-<fold>`` stages), or every member and/or fold in turn."""
    if member is not None and member not in cfg.ensemble.members:
        raise StageError(f"member {member} is not in ensemble.members {cfg.ensemble.members}")
    members = [member] if member is not None else cfg.ensemble.members
    folds = [fold] if fold is not None else cfg.split.fold_ids
    return {stage_name(m, f): run_member(cfg, m, f) for m in members for f in folds}
