"""The head stage: trains on cached features (one random copy per image per epoch), learns, predicts,
saves a head the fine-tune stage can load."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from test_features import write_tiny_dataset

from pipeline import features, head
from pipeline.config import CLASSES, Config, HeadConfig
from pipeline.errors import StageError
from pipeline.io import read_json
from pipeline.metrics import read_predictions


def configured(smoke_cfg: Config, **head_values) -> Config:
    cfg = smoke_cfg.model_copy(update={
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
    return cfg, head.run(cfg)


def test_head_learns_predicts_and_reports(trained):
    cfg, figures = trained
    assert figures["valid_logloss"] < 0.7 * math.log(10)  # chance is ln(10) = 2.303
    assert figures["valid_acc"] > 0.5
    assert "test_logloss" in figures and figures["test_logloss"] < math.log(10)  # hidden labels exist here
    assert read_json(cfg.paths.stage_metrics_file("head")) == figures

    pred_dir = cfg.paths.path("predictions") / "head"
    split = pd.read_csv(cfg.paths.path("split_csv"))
    valid_imgs, valid_probs = read_predictions(pred_dir / "valid.csv")
    assert valid_imgs == split.loc[split["split"] == "valid", "img"].tolist()
    test_imgs, test_probs = read_predictions(pred_dir / "test.csv")
    assert test_imgs == pd.read_csv(cfg.paths.path("raw") / "test_index.csv")["img"].tolist()
    for probs in (valid_probs, test_probs):
        assert probs.shape[1] == len(CLASSES) and np.allclose(probs.sum(1), 1, atol=1e-4)

    head_dir = cfg.paths.path("models") / "head"
    assert (head_dir / "best.ckpt").exists() and (head_dir / "last.ckpt").exists()
    log = pd.read_csv(head_dir / "logs" / "metrics.csv")
    assert {"train/loss", "train/lr", "valid/logloss", "valid/acc"} <= set(log.columns)
    lrs = log["train/lr"].dropna().tolist()
    assert lrs[0] == pytest.approx(cfg.head.first_epoch_lr) and lrs[1:] == pytest.approx([cfg.head.lr] * (len(lrs) - 1))

    # head.pt rebuilds the best head: it reproduces the written validation predictions.
    module, meta = head.load_head(head_dir / "head.pt")
    assert meta["in_features"] == features.load_meta(cfg.paths.path("features"))["feature_dim"]
    assert meta["grid"] == cfg.features.grid and meta["widths"] == cfg.head.widths
    valid = features.load_split(cfg.paths.path("features"), "valid")
    np.testing.assert_allclose(head.predict_probs(module, valid.features), valid_probs, rtol=1e-4, atol=1e-5)


def test_head_training_is_deterministic(trained):
    cfg, figures = trained
    _, first = read_predictions(cfg.paths.path("predictions") / "head" / "valid.csv")
    again = head.run(cfg)
    _, second = read_predictions(cfg.paths.path("predictions") / "head" / "valid.csv")
    assert again["valid_logloss"] == pytest.approx(figures["valid_logloss"], abs=1e-6)
    np.testing.assert_allclose(first, second, atol=1e-6)


def test_head_refuses_a_missing_or_partial_cache(smoke_cfg):
    with pytest.raises(StageError, match="features stage"):
        head.run(smoke_cfg)


def test_one_random_copy_per_image_per_epoch():
    n_images, copies = 50, 4
    row_table = np.arange(n_images * copies).reshape(copies, n_images).T  # copy-major rows
    sampler = head.RandomCopyBatches(row_table, batch_size=8, seed=1)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        rows = np.concatenate(list(sampler))
        assert len(rows) == n_images and len(list(sampler)) == len(sampler) == 7
        assert sorted(rows % n_images) == list(range(n_images))  # every image exactly once
        epochs.append(rows)
    assert not np.array_equal(epochs[0] // n_images, epochs[1] // n_images)  # copies change per epoch
    assert len(set((epochs[0] // n_images).tolist())) == copies
    sampler.set_epoch(1)
    assert np.array_equal(np.concatenate(list(sampler)), epochs[1])  # seeded by (seed, epoch)


def test_feature_batches_are_fetched_by_row_lists():
    feats = torch.arange(20, dtype=torch.float16).view(10, 2)
    dataset = head.FeatureBatches(feats, torch.arange(10))
    x, y = dataset[[3, 1]]
    assert x.tolist() == [[6, 7], [2, 3]] and y.tolist() == [3, 1]


@pytest.mark.parametrize("name, cls, extra", [
    ("adam", torch.optim.Adam, {}),
    ("sgd", torch.optim.SGD, {"nesterov": False, "momentum": 0.9}),
    ("nesterov", torch.optim.SGD, {"nesterov": True, "momentum": 0.9}),
    ("rmsprop", torch.optim.RMSprop, {}),
])
def test_optimizers_from_config(name, cls, extra):
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = head.create_optimizer(params, HeadConfig(optimizer=name, lr=0.01))
    assert type(opt) is cls and opt.param_groups[0]["lr"] == 0.01
    for key, value in extra.items():
        assert opt.param_groups[0][key] == value


def test_first_epoch_runs_at_the_low_learning_rate():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-2)
    schedule = head.first_epoch_schedule(opt, first_epoch_lr=1e-4, lr=1e-2)
    seen = []
    for _ in range(3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert seen == pytest.approx([1e-4, 1e-2, 1e-2])
