"""``head`` stage: the dense batchnorm + dropout head trained on the cached conv features.

Each epoch sees every train image once, as one of its cached copies drawn at random (copy 0 is the
plain image, 1.. augmented), so ten precomputed copies give augmentation at cached speed. Validation
uses the unaugmented valid rows. The first epoch runs at ``head.first_epoch_lr`` (the course: a low
learning rate first, or the net can lock onto one class), then ``head.lr``. Early stopping and the
best checkpoint follow ``valid/logloss``.

Outputs
- ``models/head/best.ckpt``, ``last.ckpt`` (Lightning), ``models/head/logs/metrics.csv``
  (``train/loss``, ``train/lr``, ``valid/logloss``, ``valid/acc`` per epoch).
- ``models/head/head.pt``: ``{"state_dict": <head nn.Sequential state_dict>, "meta": {...}}`` with the
  best weights; ``load_head(path)`` rebuilds the module. The head's input is the conv base's output
  (``pipeline.models.ConvBase``: pool5 average-pooled to ``meta["grid"]``, flattened), so a fine-tune
  stage builds ``ConvNet(create_conv_base(create_backbone(cfg.model), data_cfg, meta["grid"],
  frozen=False), load_head(path)[0])`` and starts from exactly this classifier.
- ``data/predictions/head/{valid,test}.csv`` (``img,c0..c9``) and ``reports/stages/head.json``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.config import CLASSES, Config, HeadConfig
from pipeline.data import class_index
from pipeline.features import FeatureSplit, load_meta, load_split
from pipeline.io import atomic_path
from pipeline.metrics import evaluate, read_hidden_labels, write_predictions, write_stage_metrics
from pipeline.models import create_dense_head

MONITOR = "valid/logloss"
HEAD_FILE = "head.pt"


# ---------------------------------------------------------------------------- data


class FeatureBatches(Dataset):
    """Cached feature rows, fetched a whole batch at a time: ``dataset[list_of_rows]`` returns
    ``(fp16 features (B, D), labels (B,))``. Used with ``batch_size=None`` and a batch sampler."""

    def __init__(self, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor):
        self.features = torch.as_tensor(features)
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, rows: list[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return self.features[rows], self.labels[rows]


class RandomCopyBatches(Sampler[list[int]]):
    """Per epoch: one random copy of every image, in a random order, in batches of row numbers.
    ``row_table[i, k]`` is the row of copy ``k`` of image ``i``. Seeded by ``(seed, epoch)``;
    Lightning calls ``set_epoch`` before each epoch."""

    def __init__(self, row_table: np.ndarray, batch_size: int, seed: int = 0):
        self.row_table = torch.tensor(np.asarray(row_table), dtype=torch.long)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return (len(self.row_table) + self.batch_size - 1) // self.batch_size

    def epoch_rows(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n_images, copies = self.row_table.shape
        choice = torch.randint(copies, (n_images,), generator=gen)
        order = torch.randperm(n_images, generator=gen)
        return self.row_table[order, choice[order]]

    def __iter__(self) -> Iterator[list[int]]:
        rows = self.epoch_rows()
        for start in range(0, len(rows), self.batch_size):
            yield rows[start:start + self.batch_size].tolist()


class SequentialBatches(Sampler[list[int]]):
    """Rows in order, in batches (validation, prediction)."""

    def __init__(self, rows: np.ndarray, batch_size: int):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.batch_size = int(batch_size)

    def __len__(self) -> int:
        return (len(self.rows) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.rows), self.batch_size):
            yield self.rows[start:start + self.batch_size].tolist()


def copy_row_table(split: FeatureSplit) -> np.ndarray:
    """``(n_images, copies)`` row numbers, image order = the copy-0 order."""
    index = split.index
    table = index.pivot(index="img", columns="copy", values="row")
    first = index.loc[index["copy"] == 0, "img"]
    return table.loc[first].to_numpy(dtype=np.int64)


def split_labels(split: FeatureSplit) -> np.ndarray:
    return class_index(split.index["classname"].tolist())


class CachedFeaturesDataModule(L.LightningDataModule):
    """Train: random copy per image per epoch; valid: the unaugmented valid rows."""

    def __init__(self, train: FeatureSplit, valid: FeatureSplit, batch_size: int, seed: int = 0):
        super().__init__()
        self.train_split, self.valid_split = train, valid
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> DataLoader:
        dataset = FeatureBatches(self.train_split.features, split_labels(self.train_split))
        sampler = RandomCopyBatches(copy_row_table(self.train_split), self.batch_size, self.seed)
        return DataLoader(dataset, batch_size=None, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        dataset = FeatureBatches(self.valid_split.features, split_labels(self.valid_split))
        return DataLoader(dataset, batch_size=None, sampler=SequentialBatches(self.valid_split.rows_of_copy(0), self.batch_size))


# ---------------------------------------------------------------------------- model


def create_optimizer(params: Iterator[nn.Parameter] | list[nn.Parameter], head_cfg: HeadConfig) -> torch.optim.Optimizer:
    """adam | sgd (momentum) | nesterov (SGD with Nesterov momentum) | rmsprop, at ``head.lr``."""
    lr, wd = head_cfg.lr, head_cfg.weight_decay
    if head_cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if head_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=head_cfg.momentum, weight_decay=wd)
    if head_cfg.optimizer == "nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=head_cfg.momentum, nesterov=True, weight_decay=wd)
    if head_cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, alpha=0.9, weight_decay=wd)
    raise ValueError(f"unknown optimizer {head_cfg.optimizer!r}")


def first_epoch_schedule(optimizer: torch.optim.Optimizer, first_epoch_lr: float, lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """``first_epoch_lr`` during epoch 0, ``lr`` afterwards (stepped once per epoch)."""
    ratio = first_epoch_lr / lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: ratio if epoch == 0 else 1.0)


class HeadModule(L.LightningModule):
    """Trains an injected head on cached features; logs train/loss, valid/logloss, valid/acc."""

    def __init__(self, head: nn.Module, head_cfg: HeadConfig):
        super().__init__()
        self.head = head
        self.head_cfg = head_cfg
        self.save_hyperparameters({"head": head_cfg.model_dump(mode="json")})
        self._valid_loss_sum = 0.0
        self._valid_correct = 0
        self._valid_count = 0

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features.float())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features, labels = batch
        loss = F.cross_entropy(self(features), labels)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def on_train_epoch_start(self) -> None:
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=False, on_epoch=True)

    def on_validation_epoch_start(self) -> None:
        self._valid_loss_sum, self._valid_correct, self._valid_count = 0.0, 0, 0

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        features, labels = batch
        logits = self(features)
        self._valid_loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        self._valid_correct += int((logits.argmax(1) == labels).sum())
        self._valid_count += len(labels)

    def on_validation_epoch_end(self) -> None:
        n = max(self._valid_count, 1)
        self.log(MONITOR, self._valid_loss_sum / n, prog_bar=True)
        self.log("valid/acc", self._valid_correct / n)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = create_optimizer(self.head.parameters(), self.head_cfg)
        scheduler = first_epoch_schedule(optimizer, self.head_cfg.first_epoch_lr, self.head_cfg.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


# ---------------------------------------------------------------------------- head file


def save_head(path: Path, head: nn.Module, meta: dict[str, Any]) -> Path:
    """``{"state_dict", "meta"}``, written atomically; ``load_head`` reads it back."""
    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state, "meta": meta}, tmp)
    return Path(path)


def load_head(path: Path | str) -> tuple[nn.Sequential, dict[str, Any]]:
    """The dense head saved by this stage (eval mode) and its meta (in_features, widths, grid, ...)."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = blob["meta"]
    head = create_dense_head(meta["in_features"], meta["widths"], meta["dropout"], meta["num_classes"])
    head.load_state_dict(blob["state_dict"])
    return head.eval(), meta


@torch.no_grad()
def predict_probs(head: nn.Module, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    head = head.eval()
    device = next(head.parameters()).device
    out = [F.softmax(head(torch.as_tensor(features[i:i + batch_size]).to(device).float()), dim=1).cpu()
           for i in range(0, len(features), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros((0, len(CLASSES)))


# ---------------------------------------------------------------------------- stage


def quiet_lightning() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")  # logs/ lives there; old checkpoints are cleared


def build_trainer(cfg: Config, head_dir: Path) -> tuple[L.Trainer, ModelCheckpoint]:
    checkpoint = ModelCheckpoint(dirpath=head_dir, filename="best", monitor=MONITOR, mode="min", save_top_k=1,
                                 save_last=True, auto_insert_metric_name=False, enable_version_counter=False)
    stopping = EarlyStopping(monitor=MONITOR, mode="min", patience=cfg.head.patience)
    trainer = L.Trainer(
        accelerator=cfg.head.accelerator,
        devices=1,
        max_epochs=cfg.head.max_epochs,
        callbacks=[checkpoint, stopping],
        logger=CSVLogger(save_dir=head_dir, name="logs", version=""),
        enable_model_summary=False,
        enable_progress_bar=cfg.head.progress_bar,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        use_distributed_sampler=False,
        deterministic="warn",
    )
    return trainer, checkpoint


def clear_previous_run(head_dir: Path) -> None:
    for name in ("best.ckpt", "last.ckpt", HEAD_FILE):
        (head_dir / name).unlink(missing_ok=True)
    metrics = head_dir / "logs" / "metrics.csv"
    metrics.unlink(missing_ok=True)


def head_meta(cfg: Config, features_meta: dict[str, Any], in_features: int) -> dict[str, Any]:
    return {
        "in_features": in_features,
        "widths": list(cfg.head.widths),
        "dropout": cfg.head.dropout,
        "num_classes": len(CLASSES),
        "classes": list(CLASSES),
        "layout": "BatchNorm1d -> [Dropout -> Linear -> ReLU -> BatchNorm1d]*len(widths) -> Dropout -> Linear (logits)",
        "input": "pipeline.models.ConvBase output: pool5 adaptive-avg-pooled to grid x grid, flattened",
        **{k: features_meta[k] for k in ("arch", "width_divisor", "weights", "input_size", "mean", "std", "channels", "grid")},
    }


def fit_head(cfg: Config, train: FeatureSplit, valid: FeatureSplit, out_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fit a fresh head with ``cfg.head`` on ``train`` (early stopping on ``valid``); return the
    best-checkpoint head (eval, CPU) and training facts. Shared by this stage and ensemble members."""
    L.seed_everything(cfg.head.seed, workers=True, verbose=False)
    in_features = int(train.features.shape[1])
    module = HeadModule(create_dense_head(in_features, cfg.head.widths, cfg.head.dropout, len(CLASSES)), cfg.head)
    data = CachedFeaturesDataModule(train, valid, cfg.head.batch_size, cfg.head.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    clear_previous_run(out_dir)
    trainer, checkpoint = build_trainer(cfg, out_dir)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
    module.load_state_dict(best["state_dict"])
    epochs = int(trainer.current_epoch)
    facts = {
        "epochs": epochs,
        "best_epoch": int(best.get("epoch", -1)),
        "best_valid_logloss_during_training": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "train_seconds": round(seconds, 3),
        "seconds_per_epoch": round(seconds / max(epochs, 1), 3),
    }
    return module.head.cpu().eval(), facts


def predict_and_score(cfg: Config, head: torch.nn.Module, valid: FeatureSplit, test: FeatureSplit, pred_dir: Path) -> dict[str, Any]:
    """Predict the unaugmented valid and test rows, write ``pred_dir/{valid,test}.csv``, return the
    validation (and, with hidden labels, test) figures."""
    valid_rows, test_rows = valid.rows_of_copy(0), test.rows_of_copy(0)
    valid_probs = predict_probs(head, valid.features[valid_rows])
    test_probs = predict_probs(head, test.features[test_rows])
    valid_imgs = valid.index["img"].to_numpy()[valid_rows]
    test_imgs = test.index["img"].to_numpy()[test_rows]
    write_predictions(pred_dir / "valid.csv", valid_imgs, valid_probs)
    write_predictions(pred_dir / "test.csv", test_imgs, test_probs)
    return evaluate(valid_probs, split_labels(valid)[valid_rows], list(test_imgs), test_probs,
                    read_hidden_labels(cfg.paths.path("hidden")))


def run(cfg: Config) -> dict[str, Any]:
    """Train the head on the feature cache, predict valid and test, report; return the figures."""
    start = time.perf_counter()
    quiet_lightning()
    features_dir = cfg.paths.path("features")
    features_meta = load_meta(features_dir)
    train, valid, test = (load_split(features_dir, s) for s in ("train", "valid", "test"))
    head_dir = cfg.paths.path("models") / "head"
    head, facts = fit_head(cfg, train, valid, head_dir)
    save_head(head_dir / HEAD_FILE, head, head_meta(cfg, features_meta, int(features_meta["feature_dim"])))
    figures = predict_and_score(cfg, head, valid, test, cfg.paths.path("predictions") / "head")
    figures.update({**facts, "n_train_images": int(train.index["copy"].eq(0).sum()), "copies": train.copies,
                    "seconds": round(time.perf_counter() - start, 3)})
    write_stage_metrics(cfg.paths.stage_metrics_file("head"), figures)
    return figures


def main() -> None:
    """Run the stage with params.yaml (the same as ``python -m pipeline head``)."""
    from pipeline.cli import main as cli_main

    raise SystemExit(cli_main(["head"]))
