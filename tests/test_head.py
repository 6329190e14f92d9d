"""The head stage: trains on cached features (one random copy per image per epoch), learns, predicts,
saves a head the fine-tune stage can load; once per fold, never watching a fold's own rows in cv mode."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from conftest import with_validation
from test_features import write_tiny_dataset

from pipeline.config import Config
from pipeline.convfeatures import cache as featurecache
from pipeline.errors import StageError
from pipeline.io import read_json
from pipeline.metrics import read_predictions
from pipeline.stages import features, head
from pipeline.synthetic.drivers import CLASSES
from pipeline.training.head import load_head
from pipeline.training.prediction import predict_features


def configured(smoke_cfg: Config, validation: str = "holdout", **head_values) -> Config:
    cfg = with_validation(smoke_cfg, validation).model_copy(update={
        "features": smoke_cfg.features.model_copy(update={"copies": 3, "chunk_size": 64}),
        "head": smoke_cfg.head.model_copy(update={"max_epochs": 12, "patience": 12, "lr": 1e-2, "batch_size": 16,
                                                   **head_values}),
    })
    return cfg


@pytest.fixture
def trained(smoke_cfg) -> tuple[Config, dict]:
    cfg = configured(smoke_cfg)
    write_tiny_dataset(cfg)
    features.run(cfg)
    return cfg, head.run(cfg, fold=0)


def test_head_learns_predicts_and_reports(trained):
    cfg, figures = trained
    assert figures["valid_logloss"] < 0.7 * math.log(10)  # chance is ln(10) = 2.303
    assert figures["valid_acc"] > 0.5
    assert "test_logloss" in figures and figures["test_logloss"] < math.log(10)  # hidden labels exist here
    assert read_json(cfg.paths.stage_metrics_file("head@0")) == figures

    pred_dir = cfg.paths.fold_predictions("head", 0)
    split = pd.read_csv(cfg.paths.path("split_csv"), dtype=str)
    valid_imgs, valid_probs = read_predictions(pred_dir / "oof.csv")
    assert valid_imgs == split.loc[split["split"] == "valid", "id"].tolist()
    test_imgs, test_probs = read_predictions(pred_dir / "test.csv")
    assert test_imgs == pd.read_csv(cfg.paths.path("raw") / "test_index.csv", dtype=str)["id"].tolist()
    assert pd.read_csv(pred_dir / "oof.csv", nrows=0).columns.tolist() == ["id", *CLASSES]
    for probs in (valid_probs, test_probs):
        assert probs.shape[1] == len(CLASSES) and np.allclose(probs.sum(1), 1, atol=1e-4)

    head_dir = cfg.paths.fold_models("head", 0)
    ckpts = cfg.paths.checkpoints_for(head_dir)
    assert (ckpts / "best.ckpt").exists() and (ckpts / "last.ckpt").exists()
    log = pd.read_csv(head_dir / "logs" / "metrics.csv")
    assert {"train/loss", "train/lr", "valid/logloss", "valid/acc"} <= set(log.columns)
    lrs = log["train/lr"].dropna().tolist()
    assert lrs[0] == pytest.approx(cfg.head.first_epoch_lr) and lrs[1:] == pytest.approx([cfg.head.lr] * (len(lrs) - 1))

    # head.pt rebuilds the best head: it reproduces the written validation predictions.
    module, meta = load_head(head_dir / "head.pt")
    assert meta["in_features"] == featurecache.load_meta(cfg.paths.path("features"))["feature_dim"]
    assert meta["grid"] == cfg.features.grid and meta["widths"] == cfg.head.widths
    valid = featurecache.load_split(cfg.paths.path("features"), "valid")
    np.testing.assert_allclose(predict_features(module, valid.features), valid_probs, rtol=1e-4, atol=1e-5)


def test_head_training_is_deterministic(trained):
    cfg, figures = trained
    _, first = read_predictions(cfg.paths.fold_predictions("head", 0) / "oof.csv")
    again = head.run(cfg, fold=0)
    _, second = read_predictions(cfg.paths.fold_predictions("head", 0) / "oof.csv")
    assert again["valid_logloss"] == pytest.approx(figures["valid_logloss"], abs=1e-6)
    np.testing.assert_allclose(first, second, atol=1e-6)


def test_cv_fold_heads_never_watch_their_own_fold(smoke_cfg):
    """cv: head@k trains on every other fold for exactly max_epochs (no validation loop, no early
    stopping, last weights) and predicts exactly fold k's rows."""
    cfg = configured(smoke_cfg, validation="cv", max_epochs=3, patience=1)
    write_tiny_dataset(cfg)
    features.run(cfg)
    figures = head.run(cfg)
    split = pd.read_csv(cfg.paths.path("split_csv"), dtype=str)
    assert set(figures) == {"head@0", "head@1"}
    for k in (0, 1):
        in_fold = split["fold"].astype(int) == k
        assert figures[f"head@{k}"]["n_train_images"] == int((~in_fold).sum())
        assert figures[f"head@{k}"]["epochs"] == 3
        ids, _ = read_predictions(cfg.paths.fold_predictions("head", k) / "oof.csv")
        assert ids == split.loc[in_fold, "id"].tolist()
        folder = cfg.paths.fold_models("head", k)
        ckpts = cfg.paths.checkpoints_for(folder)
        assert not (ckpts / "best.ckpt").exists() and (ckpts / "last.ckpt").exists()
        assert not any(c.startswith("valid/") for c in pd.read_csv(folder / "logs" / "metrics.csv").columns)
        assert load_head(folder / "head.pt")[1]["fold"] == k


def test_head_refuses_a_missing_or_partial_cache(smoke_cfg):
    with pytest.raises(StageError, match="features stage"):
        head.run(smoke_cfg)


