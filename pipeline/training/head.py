"""The dense head on cached features (the ``head`` stage, head members): fit, save format, predict.

``models/head/fold<k>/head.pt``: ``{"state_dict", "meta"}`` (``checkpoint.save_network``) of fold k's
dense head; ``load_head`` rebuilds it. Its input is the conv base's output
(``pipeline.models.ConvBase``), so every fine-tune of fold k starts exactly from this classifier
(``pipeline.training.fine_tuning.build_network``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from pipeline.config import Config, TrainerConfig
from pipeline.convfeatures.cache import FeatureSplit, concat_splits, load_split
from pipeline.errors import StageError
from pipeline.folds import held_out_mask
from pipeline.metrics import OOF_FILE, evaluate, read_hidden_labels, write_predictions
from pipeline.models import create_dense_head
from pipeline.training.checkpoint import load_network_file
from pipeline.training.classifier import ClassifierModule
from pipeline.training.datamodules import CachedFeaturesDataModule
from pipeline.training.folds import monitors_held_out, read_split_csv
from pipeline.training.optim import TrainSettings
from pipeline.training.prediction import predict_features
from pipeline.training.resume import fingerprint
from pipeline.training.trainer import fit_or_resume

HEAD_FILE = "head.pt"


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


def head_file(cfg: Config, fold: int) -> Path:
    """The head stage's head for ``fold``: every fine-tune of that fold starts from it."""
    path = cfg.paths.fold_models("head", fold) / HEAD_FILE
    if not path.exists():
        raise StageError(f"{path} not found: run the features and head@{fold} stages first")
    return path
