"""``head`` stage: the dense batchnorm + dropout head trained on the cached conv features.

Each epoch sees every train image once, as one of its cached copies drawn at random (copy 0 is the
plain image, 1.. augmented), so ten precomputed copies give augmentation at cached speed. Validation
uses the unaugmented valid rows. The first epoch runs at ``head.first_epoch_lr`` (the course: a low
learning rate first, or the net can lock onto one class), then ``head.lr``. Early stopping and the
best checkpoint follow ``valid/logloss``. The training itself is ``pipeline.recipes.fit_head``.

Outputs
- ``models/head/best.ckpt``, ``last.ckpt`` (Lightning), ``models/head/logs/metrics.csv``
  (``train/loss``, ``train/lr``, ``valid/logloss``, ``valid/acc`` per epoch).
- ``models/head/head.pt``: the best weights (``pipeline.recipes.load_head`` rebuilds the module).
- ``data/predictions/head/{valid,test}.csv`` and ``reports/stages/head.json``.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.config import Config
from pipeline.featurecache import load_meta, load_split
from pipeline.metrics import write_stage_metrics
from pipeline.recipes import HEAD_FILE, fit_head, head_meta, predict_and_score
from pipeline.training import quiet_training, save_network

STAGE = "head"


def run(cfg: Config) -> dict[str, Any]:
    """Train the head on the feature cache, predict valid and test, report; return the figures."""
    start = time.perf_counter()
    quiet_training()
    features_dir = cfg.paths.path("features")
    features_meta = load_meta(features_dir)
    train, valid, test = (load_split(features_dir, s) for s in ("train", "valid", "test"))
    head_dir = cfg.paths.path("models") / STAGE
    classes = features_meta["classes"]
    head, facts = fit_head(cfg, train, valid, head_dir, classes)
    figures = predict_and_score(cfg, head, valid, test, cfg.paths.path("predictions") / STAGE, classes)
    save_network(head_dir / HEAD_FILE, head, head_meta(cfg, features_meta, int(features_meta["feature_dim"])))
    figures.update({**facts, "n_train_images": int(train.index["copy"].eq(0).sum()), "copies": train.copies,
                    "seconds": round(time.perf_counter() - start, 3)})
    write_stage_metrics(cfg.paths.stage_metrics_file(STAGE), figures)
    return figures
