"""``head`` stage: the dense batchnorm + dropout head trained on the cached conv features, once per
fold (``head@<fold>``, a DVC ``foreach`` over ``split.fold_ids``).

Fold model k trains on every labelled image outside fold k (cv) or on the train split (holdout), and
predicts the rows it never saw: its out-of-fold rows. Each epoch sees every train image once, as one
of its cached copies drawn at random (copy 0 is the plain image, 1.. augmented), so ten precomputed
copies give augmentation at cached speed. The first epoch runs at ``head.first_epoch_lr`` (the fast.ai course:
a low learning rate first, or the net can lock onto one class), then ``head.lr``. In holdout mode
early stopping and the best checkpoint follow ``valid/logloss``; in cv mode the fold's rows are never
looked at during training: exactly ``head.max_epochs``, the last weights.

Outputs
- ``models/head/fold<k>/``: ``head.pt`` (``pipeline.training.head.load_head`` rebuilds it; every fine-tune of
  fold k starts from it), Lightning checkpoints and ``logs/metrics.csv``.
- ``data/predictions/folds/head/<k>/{oof,test}.csv`` and ``reports/stages/head@<k>.json``.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.config import Config, item_stage
from pipeline.convfeatures.cache import load_meta
from pipeline.metrics import write_stage_metrics
from pipeline.training.checkpoint import save_network
from pipeline.training.folds import run_folds
from pipeline.training.head import HEAD_FILE, fit_head, fold_feature_splits, head_meta, predict_and_score
from pipeline.training.trainer import quiet_training

STAGE = "head"


def run_fold(cfg: Config, fold: int) -> dict[str, Any]:
    """Train fold ``fold``'s head on the feature cache, predict its held-out rows and the test set."""
    start = time.perf_counter()
    quiet_training()
    features_meta = load_meta(cfg.paths.path("features"))
    train, held, test = fold_feature_splits(cfg, fold)
    out_dir = cfg.paths.fold_models(STAGE, fold)
    classes = features_meta["classes"]
    head, facts = fit_head(cfg, train, held, out_dir, classes, label=item_stage(STAGE, fold))
    figures = predict_and_score(cfg, head, held, test, cfg.paths.fold_predictions(STAGE, fold), classes)
    save_network(out_dir / HEAD_FILE, head, {**head_meta(cfg, features_meta, int(features_meta["feature_dim"])),
                                             "fold": fold})
    figures.update({**facts, "fold": fold, "n_train_images": int(train.index["copy"].eq(0).sum()),
                    "copies": train.copies, "seconds": round(time.perf_counter() - start, 3)})
    write_stage_metrics(cfg.paths.stage_metrics_file(item_stage(STAGE, fold)), figures)
    return figures


def run(cfg: Config, fold: int | None = None) -> dict[str, Any]:
    """One fold (the DVC ``head@<fold>`` stages), or every fold of ``split.fold_ids`` in turn."""
    return run_folds(cfg, STAGE, run_fold, fold)
