"""Fine-tuning from the head (``finetune``, ``pseudo``, fine-tuned members): the head stage's head on
a trainable conv base, trained end to end. ``models/<model>/fold<k>/model.pt``: the whole
``ConvNet`` in the checkpoint format (``pipeline.training.checkpoint``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from pipeline import data, models
from pipeline.config import Config, FinetuneConfig
from pipeline.errors import StageError
from pipeline.models import ConvNet, create_backbone, create_conv_base, input_hw, resolve_preprocessing
from pipeline.training import checkpoint, classifier, datamodules, optim, prediction, resume, trainer
from pipeline.training import head as dense_head
from pipeline.training.classifier import ClassifierModule
from pipeline.training.datamodules import ImageDataModule
from pipeline.training.folds import monitors_held_out
from pipeline.training.head import head_file, load_head
from pipeline.training.optim import TrainSettings
from pipeline.training.prediction import FineTuned
from pipeline.training.resume import fingerprint
from pipeline.training.tables import ImageTable
from pipeline.training.trainer import fit_or_resume, uses_cuda

# The code a fine-tune's checkpoints depend on, besides this module and the caller's: a change re-trains.
TRAINING_CODE = (optim, classifier, trainer, resume, checkpoint, datamodules, prediction, dense_head, data, models)


def check_head_matches(cfg: Config, meta: dict[str, Any], data_cfg: dict[str, Any], head_path: Path) -> None:
    """The head was trained on this backbone's features at this input size (else its weights mean nothing)."""
    want = {"arch": cfg.model.arch, "weights": cfg.model.weights, "input_size": list(input_hw(data_cfg)),
            "width_divisor": cfg.model.width_divisor if cfg.model.arch == "vgg16_bn_narrow" else 1}
    for key, value in want.items():
        if key in meta and meta[key] != value:
            raise StageError(f"{head_path} was trained on features with {key}={meta[key]}, the config says {value}: "
                             "rerun the features and head stages")


def build_network(cfg: Config, head_path: Path) -> tuple[ConvNet, dict[str, Any], dict[str, Any]]:
    """``ConvNet(trainable conv base of cfg.model, the head stage's head)`` in train mode, the
    backbone's preprocessing and the head's meta. At init it computes exactly what the head stage's
    head computes on the cached features' conv base."""
    head, meta = load_head(head_path)
    backbone = create_backbone(cfg.model)
    data_cfg = resolve_preprocessing(backbone, cfg.model)
    check_head_matches(cfg, meta, data_cfg, head_path)
    conv_base = create_conv_base(backbone, data_cfg, int(meta["grid"]), frozen=False)
    if conv_base.out_features != int(meta["in_features"]):
        raise StageError(f"{head_path}: head takes {meta['in_features']} features, the conv base gives "
                         f"{conv_base.out_features}: rerun the features and head stages")
    return ConvNet(conv_base, head).train(), data_cfg, meta


def run_fingerprint(cfg: Config, ft: FinetuneConfig, head_path: Path, tables: dict[str, ImageTable],
                    modules: Sequence[ModuleType] = ()) -> str:
    """What the checkpoints in a fine-tune's folder depend on (``trainer.resume`` itself excluded)."""
    settings = {
        "model": cfg.model.model_dump(mode="json"),
        "augment": cfg.augment.model_dump(mode="json"),
        "finetune": ft.model_dump(mode="json", exclude={"trainer": {"resume"}}),
        "images": {name: [t.ids, t.labels.tolist()] for name, t in tables.items() if name != "test"},
        "validation": cfg.split.validation,
    }
    return fingerprint(settings, files=[head_path],
                       modules=[*TRAINING_CODE, sys.modules[__name__], *modules])


def fine_tune(cfg: Config, ft: FinetuneConfig, tables: dict[str, ImageTable], out_dir: Path, fold: int,
              callbacks: Sequence[Callback] = (), modules: Sequence[ModuleType] = (), label: str = "finetune") -> FineTuned:
    """Fine-tune from fold ``fold``'s head with the settings ``ft`` on ``tables["train"]``, checkpoints
    in ``out_dir``; ``tables["valid"]`` (the held-out rows) steers early stopping in holdout mode only.
    Used by the finetune stage and by the fine-tuned ensemble members (their own seed and train rows)."""
    L.seed_everything(ft.seed, workers=True, verbose=False)
    head_path = head_file(cfg, fold)
    monitor = monitors_held_out(cfg)
    network, data_cfg, head_meta = build_network(cfg, head_path)
    target_hw = input_hw(data_cfg)
    cuda = uses_cuda(ft.trainer)
    module = ClassifierModule(network, TrainSettings.from_section(ft), models.backbone_blocks(network.conv_base),
                              channels_last=cuda)
    if ft.trainer.compile:
        network.compile()  # in place: state_dict keys stay those of the plain network
    watched = tables["valid"] if monitor else tables["valid"].subset(np.array([], dtype=np.int64))
    datamodule = ImageDataModule(tables["train"], watched, target_hw, cfg.augment, ft.batch_size,
                                 ft.num_workers, ft.seed, copies=ft.max_epochs, pin_memory=cuda,
                                 n_classes=int(head_meta["num_classes"]))
    outcome = fit_or_resume(module, datamodule, ft.trainer, out_dir, ft.max_epochs, ft.patience,
                            run_fingerprint(cfg, ft, head_path, tables, modules), callbacks, label, monitor=monitor,
                            ckpt_dir=cfg.paths.checkpoints_for(out_dir))
    return FineTuned(outcome, target_hw, cuda, ft.batch_size, ft.num_workers,
                     {**head_meta, "input_size": list(target_hw)})


def training_figures(fitted: FineTuned, n_train_images: int) -> dict[str, Any]:
    """Training facts (epochs, best epoch, resumed ...) and throughput."""
    facts = dict(fitted.outcome.facts)
    facts["n_train_images"] = n_train_images
    if facts.get("train_seconds") and facts.get("global_step"):
        samples = facts["global_step"] * fitted.batch_size * facts.get("world_size", 1)
        facts["train_images_per_s"] = round(samples / facts["train_seconds"], 1)  # validation time included
    return facts
