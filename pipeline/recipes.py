"""Training recipes shared by several stages, composed from the library: the dense head on cached
features (``head`` stage, head members), fine-tuning from the head (``finetune``, ``pseudo``,
fine-tuned members). A stage never imports another stage; what two stages share lives here.

Files
- ``models/head/fold<k>/head.pt``: ``{"state_dict", "meta"}`` (``training.save_network``) of fold k's dense head;
  ``load_head`` rebuilds it. Its input is the conv base's output (``pipeline.models.ConvBase``), so
  ``build_network`` puts it on a trainable conv base and starts exactly from this classifier.
- ``models/<model>/fold<k>/model.pt``: the same format for the whole ``ConvNet``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
from lightning.pytorch.callbacks import Callback
from torch import nn

from pipeline import data, datamodules, models, training
from pipeline.config import AugmentConfig, Config, FinetuneConfig, TrainerConfig
from pipeline.datamodules import CachedFeaturesDataModule, ImageDataModule
from pipeline.errors import StageError
from pipeline.featurecache import FeatureSplit, concat_splits, load_split
from pipeline.folds import held_out_mask
from pipeline.metrics import OOF_FILE, evaluate, keep_tta_if_better, read_hidden_labels, write_predictions
from pipeline.models import (
    ConvNet,
    create_backbone,
    create_conv_base,
    create_dense_head,
    input_hw,
    resolve_preprocessing,
)
from pipeline.tables import ImageTable
from pipeline.training import (
    ClassifierModule,
    FitOutcome,
    TrainSettings,
    fingerprint,
    fit_or_resume,
    load_network_file,
    predict_features,
    predict_probs,
    uses_cuda,
)

HEAD_FILE = "head.pt"


# ---------------------------------------------------------------------------- the dense head


def head_meta(cfg: Config, features_meta: dict[str, Any], in_features: int) -> dict[str, Any]:
    classes = list(features_meta["classes"])
    return {
        "in_features": in_features,
        "widths": list(cfg.head.widths),
        "dropout": cfg.head.dropout,
        "num_classes": len(classes),
        "classes": classes,
        "layout": "BatchNorm1d -> [Dropout -> Linear -> ReLU -> BatchNorm1d]*len(widths) -> Dropout -> Linear (logits)",
        "input": "pipeline.models.ConvBase output: pool5 adaptive-avg-pooled to grid x grid, flattened",
        **{k: features_meta[k] for k in ("arch", "width_divisor", "weights", "input_size", "mean", "std", "channels", "grid")},
    }


def head_trainer_config(cfg: Config) -> TrainerConfig:
    """The head is small: one device, fp32, trained afresh each run (seconds)."""
    return TrainerConfig(accelerator=cfg.head.accelerator, devices=1, precision="32-true", resume=False,
                         log_every_n_steps=1)


def monitors_held_out(cfg: Config) -> bool:
    """Whether training may watch its held-out rows (early stopping, best checkpoint): in holdout mode
    yes (the validation split, as fast.ai's Practical Deep Learning for Coders, part 1 (2017), watches
    it); in cv mode never, so out-of-fold predictions stay honest: fold models train exactly
    ``max_epochs`` and keep the last weights."""
    return cfg.split.validation == "holdout"


def fold_feature_splits(cfg: Config, fold: int) -> tuple[FeatureSplit, FeatureSplit, FeatureSplit]:
    """Fold model ``fold``'s cached features: train (every copy of its train images), held out (copy 0
    of the images it predicts out of fold) and test."""
    features_dir = cfg.paths.path("features")
    train_cache, valid_cache, test = (load_split(features_dir, s) for s in ("train", "valid", "test"))
    split = read_split_csv(cfg.paths.path("split_csv"))
    held = held_out_mask(split, fold, cfg.split.validation)
    held_ids, train_ids = set(split.loc[held, "id"]), set(split.loc[~held, "id"])
    cached = set(train_cache.index["id"])
    if not train_ids <= cached:
        raise StageError(f"{features_dir}: {len(train_ids - cached)} train image(s) of fold {fold} have no cached "
                         "copies: rerun the features stage")
    held_split = concat_splits("held_out", [train_cache.subset(held_ids, plain_only=True), valid_cache.subset(held_ids)])
    return train_cache.subset(train_ids), held_split, test


def read_split_csv(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise StageError(f"{path} not found: run the split stage first")
    return pd.read_csv(path, dtype={"id": str, "label": str, "group": str, "split": str}, keep_default_na=False)


def fit_head(cfg: Config, train: FeatureSplit, valid: FeatureSplit, out_dir: Path, classes: Sequence[str],
             label: str = "head") -> tuple[nn.Module, dict[str, Any]]:
    """Fit a fresh head with ``cfg.head`` on ``train`` (early stopping on ``valid`` in holdout mode; in
    cv mode ``valid`` is never looked at); return the head (eval, CPU) and training facts. Shared by
    the head stage and head members."""
    L.seed_everything(cfg.head.seed, workers=True, verbose=False)
    monitor = monitors_held_out(cfg)
    in_features = int(train.features.shape[1])
    head = create_dense_head(in_features, cfg.head.widths, cfg.head.dropout, len(classes))
    module = ClassifierModule(head, TrainSettings.from_section(cfg.head))
    watched = valid if monitor else valid.subset(())
    datamodule = CachedFeaturesDataModule(train, watched, cfg.head.batch_size, classes, cfg.head.seed)
    run_fp = fingerprint({"head": cfg.head.model_dump(mode="json"), "label": label, "monitor": monitor,
                          "train": train.index["id"].tolist()})
    outcome = fit_or_resume(module, datamodule, head_trainer_config(cfg), out_dir, cfg.head.max_epochs,
                            cfg.head.patience, run_fp, label=label, monitor=monitor,
                            ckpt_dir=cfg.paths.checkpoints_for(out_dir))
    facts = dict(outcome.facts)
    facts["seconds_per_epoch"] = round(facts.get("train_seconds", 0.0) / max(facts.get("epochs", 1), 1), 3)
    return outcome.network.cpu().eval(), facts


def load_head(path: Path | str) -> tuple[nn.Sequential, dict[str, Any]]:
    """The dense head saved by the head stage (eval mode) and its meta (in_features, widths, grid, ...)."""
    blob = load_network_file(path, "head")
    meta = blob.get("meta", {})
    head = create_dense_head(meta["in_features"], meta["widths"], meta["dropout"], meta["num_classes"])
    head.load_state_dict(blob["state_dict"])
    return head.eval(), meta


def predict_and_score(cfg: Config, head: nn.Module, valid: FeatureSplit, test: FeatureSplit, pred_dir: Path,
                      classes: Sequence[str]) -> dict[str, Any]:
    """Predict the unaugmented held-out and test rows, write ``pred_dir/{oof,test}.csv``, return the
    held-out (and, with hidden labels, test) figures."""
    valid_rows, test_rows = valid.rows_of_copy(0), test.rows_of_copy(0)
    valid_probs = predict_features(head, valid.features[valid_rows])
    test_probs = predict_features(head, test.features[test_rows])
    valid_ids = valid.index["id"].to_numpy()[valid_rows]
    test_ids = test.index["id"].to_numpy()[test_rows]
    figures = evaluate(valid_probs, valid.labels(classes)[valid_rows], list(test_ids), test_probs,
                       read_hidden_labels(cfg.paths.path("hidden"), classes))
    write_predictions(pred_dir / OOF_FILE, valid_ids, valid_probs, classes)
    write_predictions(pred_dir / "test.csv", test_ids, test_probs, classes)
    return figures


# ---------------------------------------------------------------------------- fine-tuning from the head


def head_file(cfg: Config, fold: int) -> Path:
    """The head stage's head for ``fold``: every fine-tune of that fold starts from it."""
    path = cfg.paths.fold_models("head", fold) / HEAD_FILE
    if not path.exists():
        raise StageError(f"{path} not found: run the features and head@{fold} stages first")
    return path


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
                       modules=[training, datamodules, data, models, sys.modules[__name__], *modules])


@dataclass
class FineTuned:
    """A fine-tuned network (best checkpoint, eval mode) and how to run it."""

    outcome: FitOutcome
    target_hw: tuple[int, int]
    cuda: bool
    batch_size: int
    num_workers: int
    meta: dict[str, Any]  # the head stage's meta plus input_size

    def predict(self, table: ImageTable, copy: int = 0, augment: AugmentConfig | None = None, seed: int = 0) -> np.ndarray:
        """Probabilities of every row of ``table``: plain, or its augmented copy ``copy`` (TTA)."""
        return predict_probs(self.outcome.network, table, self.target_hw, self.batch_size * 2, self.num_workers,
                             self.outcome.device, self.cuda, copy=copy, augment=augment, seed=seed)


def tta_predictions(cfg: Config, fitted: FineTuned, valid: ImageTable, test: ImageTable) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Held-out and test probabilities of a fine-tuned CNN: the plain pass, or its mean with
    ``ensemble.tta`` augmented passes (the features stage's copies 1..tta, never flipped). In cv mode
    TTA is always kept when configured (a fold's rows must not decide anything about their own model);
    in holdout mode only when it lowers the validation log loss."""
    passes, augment, seed = cfg.ensemble.tta, cfg.augment, cfg.features.seed

    def averaged(table: ImageTable, plain: np.ndarray) -> np.ndarray:
        return np.mean([plain, *(fitted.predict(table, k, augment, seed) for k in range(1, passes + 1))], axis=0)

    valid_plain, test_plain = fitted.predict(valid), fitted.predict(test)
    return keep_tta_if_better(valid.labels, valid_plain, test_plain,
                              (lambda: averaged(valid, valid_plain)) if passes else None,
                              lambda: averaged(test, test_plain), decide=monitors_held_out(cfg))


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

