"""End-to-end training shared by the ``finetune`` and ``pseudo`` stages: the image DataModule, the
batch samplers, the LightningModule (which receives its network), the trainer factory, resumable
fits and (distributed) prediction.

Batches. A training batch is a dict: ``image`` (uint8 NCHW), ``target`` (a class distribution:
one-hot for labelled rows, the teacher's probabilities for soft pseudo-labels), ``pseudo`` (bool)
and ``temperature`` (1, or the distillation temperature for pseudo rows). One loss covers all of
them: ``T^2 * cross_entropy(softmax(logits / T), target)``, which is plain cross-entropy for a
labelled row. Every batch is full: ``MixedBatchSampler`` composes it of exactly
``round(fraction * batch_size)`` pseudo rows and the rest labelled (0 pseudo rows for finetune).

Augmentation. Train row ``c * n + i`` is augmented copy ``c + 1`` of image ``i`` (pipeline.data:
a pure function of seed, copy and file name); epoch ``e`` uses copy ``e % copies``, so a resumed
epoch sees the same pixels as the original. Validation and test rows are never augmented.

Staged unfreezing. VGG's conv stack is 5 blocks (each ends in a max pool). The head and the last
``unfreeze_blocks`` blocks train first; every ``unfreeze_every`` epochs one more block joins. Every
parameter is in the optimiser from the start (block ``k`` from the end at ``lr * layer_lr_decay**k``);
a frozen one has no gradient, so the optimiser skips it, and its batchnorm stays in eval mode.
Epoch 0 runs every group at ``first_epoch_lr / lr`` of its rate (the course: a low first epoch).

Distributed. Lightning DDP re-executes the entry point per rank, so every rank runs the whole stage
function: samplers shard batches by rank themselves (``use_distributed_sampler=False``), only the
launcher process (rank 0) writes files, and prediction after a fit is sharded over the ranks and
gathered, so every rank holds the same probabilities (pseudo-labels for the next iteration).

Resume. ``<out>/run.json`` holds a fingerprint of the config, inputs and code. A run of the same
fingerprint that was interrupted resumes from ``last.ckpt``; a complete one is reused (its best
checkpoint loaded) without training; anything else starts fresh. Checkpoints must be on a file
system every rank sees (multi-node), as Lightning's ``ckpt_path`` needs anyway.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler, Subset

from pipeline.config import CLASSES, AugmentConfig, Config, FinetuneConfig, TrainerConfig
from pipeline.data import ImageRowsDataset, build_augmentation, class_index, seed_worker
from pipeline.errors import StageError
from pipeline.features import read_image_tables
from pipeline.head import HEAD_FILE, first_epoch_schedule, load_head, quiet_lightning
from pipeline.io import atomic_path, atomic_write_json, file_sha256, read_json
from pipeline.models import ConvNet, create_backbone, create_conv_base, input_hw, resolve_preprocessing

MONITOR = "valid/logloss"
RUN_FILE = "run.json"
MODEL_FILE = "model.pt"
NUM_CLASSES = len(CLASSES)


# ---------------------------------------------------------------------------- image tables


@dataclass(frozen=True)
class ImageTable:
    """Images of one split: names, absolute paths and class indices (-1 for test images)."""

    imgs: list[str]
    paths: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.imgs)

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> ImageTable:
        return cls(frame["img"].tolist(), frame["path"].tolist(), class_index(frame["classname"].tolist()))

    def subset(self, rows: np.ndarray) -> ImageTable:
        rows = np.asarray(rows, dtype=np.int64)
        return ImageTable([self.imgs[i] for i in rows], [self.paths[i] for i in rows], self.labels[rows])


def read_tables(cfg: Config, use_sample: bool) -> dict[str, ImageTable]:
    """train (split train rows), valid (split valid rows) and test, as the features stage reads them
    (adapter: ``features.read_image_tables`` takes its sample switch from ``cfg.features``)."""
    features_cfg = cfg.features.model_copy(update={"use_sample": use_sample})
    frames = read_image_tables(cfg.model_copy(update={"features": features_cfg}))
    return {name: ImageTable.from_frame(frame) for name, frame in frames.items()}


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]


# ---------------------------------------------------------------------------- datasets


class TargetRows(Dataset):
    """Training rows with target distributions. Row ``r`` is augmented copy ``r // n + 1`` of image
    ``r % n`` (copy-major, like the feature cache); without augmentation every copy is the plain image."""

    def __init__(self, table: ImageTable, targets: np.ndarray, target_hw: tuple[int, int], copies: int,
                 augmentation: Any | None, seed: int, pseudo: bool, temperature: float = 1.0):
        if targets.shape != (len(table), NUM_CLASSES):
            raise ValueError(f"targets must be ({len(table)}, {NUM_CLASSES}), got {targets.shape}")
        self.n = len(table)
        copy_of_row = np.repeat(np.arange(1, copies + 1), self.n)
        self.images = ImageRowsDataset(table.paths * copies, target_hw, copies=copy_of_row,
                                       augmentation=augmentation, seed=seed)
        self.targets = torch.as_tensor(np.asarray(targets, dtype=np.float32))
        self.pseudo = bool(pseudo)
        self.temperature = float(temperature)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, r: int) -> dict[str, Any]:
        image, _ = self.images[r]
        return {"image": image, "target": self.targets[r % self.n], "pseudo": self.pseudo, "temperature": self.temperature}


class PaddedRows(Dataset):
    """Unaugmented labelled rows plus one blank padding row (index ``n``, label -1) that the
    metrics ignore, so every rank can run the same number of validation batches."""

    def __init__(self, table: ImageTable, target_hw: tuple[int, int]):
        self.images = ImageRowsDataset(table.paths, target_hw, labels=table.labels)
        self.target_hw = target_hw

    def __len__(self) -> int:
        return len(self.images) + 1

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i == len(self.images):
            return {"image": torch.zeros(3, *self.target_hw, dtype=torch.uint8), "label": -1}
        image, label = self.images[i]
        return {"image": image, "label": label}


# ---------------------------------------------------------------------------- samplers


def epoch_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def pseudo_per_batch(fraction: float, batch_size: int) -> int:
    """``round(fraction * batch_size)`` (halves up), at least 1 and leaving at least 1 labelled row."""
    count = int(math.floor(fraction * batch_size + 0.5))
    if not 1 <= count < batch_size:
        raise StageError(f"pseudo.fraction={fraction:.4g} of a batch of {batch_size} gives {count} pseudo-labelled "
                         f"rows: raise finetune.batch_size (needs at least 1 pseudo and 1 labelled row)")
    return count


def cycled_permutations(gen: torch.Generator, n: int, length: int) -> torch.Tensor:
    """``length`` indices: fresh permutations of ``range(n)`` back to back (each index once per lap)."""
    if length == 0:
        return torch.zeros(0, dtype=torch.long)
    laps = -(-length // n)
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(laps)])[:length]


class MixedBatchSampler(Sampler[list[int]]):
    """Full batches of ``batch_size - k`` labelled and exactly ``k`` pseudo-labelled rows.

    Indices address ``ConcatDataset([labelled TargetRows, pseudo TargetRows])``, each holding
    ``copies`` copies. An epoch covers every labelled image at least once (the last batch is filled
    from the next lap); pseudo rows cycle the same way. The global batch list depends only on
    ``(seed, epoch)``; rank ``r`` of ``w`` takes batches ``r, r + w, ...`` (the count is rounded up
    to a multiple of ``w`` so every rank steps equally). Lightning calls ``set_epoch`` through
    ``batch_sampler.sampler`` (this object)."""

    def __init__(self, n_labelled: int, n_pseudo: int, batch_size: int, pseudo_count: int = 0, copies: int = 1,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if n_labelled < 1:
            raise StageError("no labelled training images")
        if pseudo_count and n_pseudo < 1:
            raise StageError("pseudo-labelled rows requested but the pseudo set is empty")
        if not 0 <= pseudo_count < batch_size:
            raise ValueError(f"pseudo_count must be in [0, batch_size), got {pseudo_count} of {batch_size}")
        self.n_labelled, self.n_pseudo = int(n_labelled), int(n_pseudo)
        self.batch_size, self.pseudo_count = int(batch_size), int(pseudo_count)
        self.labelled_count = self.batch_size - self.pseudo_count
        self.copies, self.seed = int(copies), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        batches = -(-self.n_labelled // self.labelled_count)
        self.total_batches = -(-batches // self.world_size) * self.world_size
        self.epoch = 0

    @property
    def sampler(self) -> MixedBatchSampler:
        return self

    @property
    def pseudo_offset(self) -> int:
        """Dataset indices from here on are pseudo-labelled rows."""
        return self.copies * self.n_labelled

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.total_batches // self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        total, lab, k = self.total_batches, self.labelled_count, self.pseudo_count
        copy = self.epoch % self.copies
        labelled = copy * self.n_labelled + cycled_permutations(gen, self.n_labelled, total * lab)
        pseudo = self.pseudo_offset + copy * max(self.n_pseudo, 1) + cycled_permutations(gen, self.n_pseudo, total * k)
        for b in range(self.rank, total, self.world_size):
            yield labelled[b * lab:(b + 1) * lab].tolist() + pseudo[b * k:(b + 1) * k].tolist()


class ShardedBatches(Sampler[list[int]]):
    """Rows ``rank::world_size`` in order, in batches, padded with the sentinel row ``n`` (see
    ``PaddedRows``) so that every rank has ``ceil(n / world_size)`` rows."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.rank, self.world_size = int(n), int(batch_size), int(rank), int(world_size)

    def rows(self) -> list[int]:
        rows = list(range(self.rank, self.n, self.world_size))
        return rows + [self.n] * (-(-self.n // self.world_size) - len(rows))

    def __len__(self) -> int:
        return -(-len(self.rows()) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rows = self.rows()
        for start in range(0, len(rows), self.batch_size):
            yield rows[start:start + self.batch_size]


# ---------------------------------------------------------------------------- data module


@dataclass(frozen=True)
class PseudoSet:
    """Test images with the teacher's targets (never validation or train images)."""

    table: ImageTable
    targets: np.ndarray  # (n, 10) class distributions
    fraction: float
    temperature: float = 1.0


class ImageDataModule(L.LightningDataModule):
    """Train: the labelled train rows (augmented), plus a pseudo set mixed into every batch;
    valid: the split's valid rows, unaugmented."""

    def __init__(self, train: ImageTable, valid: ImageTable, target_hw: tuple[int, int], augment: AugmentConfig,
                 batch_size: int, num_workers: int = 0, seed: int = 0, copies: int = 1,
                 pseudo: PseudoSet | None = None, pin_memory: bool = False):
        super().__init__()
        self.train_table, self.valid_table, self.pseudo = train, valid, pseudo
        self.target_hw, self.augment = (int(target_hw[0]), int(target_hw[1])), augment
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self.copies, self.pin_memory = max(int(copies), 1), pin_memory
        self.pseudo_count = pseudo_per_batch(pseudo.fraction, batch_size) if pseudo is not None else 0

    def rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataset(self) -> Dataset:
        augmentation = build_augmentation(self.augment)
        parts: list[Dataset] = [TargetRows(self.train_table, one_hot(self.train_table.labels), self.target_hw,
                                           self.copies, augmentation, self.seed, pseudo=False)]
        if self.pseudo is not None:
            parts.append(TargetRows(self.pseudo.table, self.pseudo.targets, self.target_hw, self.copies, augmentation,
                                    self.seed, pseudo=True, temperature=self.pseudo.temperature))
        return ConcatDataset(parts)

    def train_sampler(self) -> MixedBatchSampler:
        rank, world = self.rank_and_world()
        n_pseudo = len(self.pseudo.table) if self.pseudo is not None else 0
        return MixedBatchSampler(len(self.train_table), n_pseudo, self.batch_size, self.pseudo_count, self.copies,
                                 self.seed, rank, world)

    def loader(self, dataset: Dataset, batch_sampler: Sampler[list[int]], persistent: bool) -> DataLoader:
        workers = self.num_workers
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, worker_init_fn=seed_worker,
                          pin_memory=self.pin_memory, persistent_workers=persistent and workers > 0,
                          prefetch_factor=4 if workers else None)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_dataset(), self.train_sampler(), persistent=True)

    def val_dataloader(self) -> DataLoader:
        rank, world = self.rank_and_world()
        sampler = ShardedBatches(len(self.valid_table), self.batch_size * 2, rank, world)
        return self.loader(PaddedRows(self.valid_table, self.target_hw), sampler, persistent=True)


# ---------------------------------------------------------------------------- network


def head_file(cfg: Config) -> Path:
    path = cfg.paths.path("models") / "head" / HEAD_FILE
    if not path.exists():
        raise StageError(f"{path} not found: run the features and head stages first")
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


def save_network(path: Path, network: nn.Module, meta: dict[str, Any]) -> Path:
    """``{"state_dict": ConvNet state, "meta": ...}``, atomically; rebuild with build_network + load_state_dict."""
    state = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state, "meta": meta}, tmp)
    return Path(path)


def load_network_state(path: Path) -> dict[str, torch.Tensor]:
    if not Path(path).exists():
        raise StageError(f"{path} not found: run the finetune stage first")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def conv_blocks(network: ConvNet) -> list[list[nn.Module]]:
    """VGG's conv stack split after each max pool: 5 blocks for the vgg16 layout, first to last."""
    blocks: list[list[nn.Module]] = [[]]
    for layer in network.conv_base.features:
        blocks[-1].append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append([])
    return [b for b in blocks if b]


def block_parameters(block: list[nn.Module]) -> list[nn.Parameter]:
    return [p for layer in block for p in layer.parameters()]


def trainable_block_count(epoch: int, settings: FinetuneConfig, n_blocks: int) -> int:
    """How many conv blocks (counted from the last) train in ``epoch`` under staged unfreezing."""
    extra = epoch // settings.unfreeze_every if settings.unfreeze_every else 0
    return min(n_blocks, settings.unfreeze_blocks + extra)


def set_trainable_blocks(blocks: list[list[nn.Module]], count: int) -> None:
    """The last ``count`` blocks train; earlier ones get no gradients and keep batchnorm in eval."""
    first_trainable = len(blocks) - count
    for i, block in enumerate(blocks):
        trainable = i >= first_trainable
        for layer in block:
            layer.train(trainable)
            for p in layer.parameters():
                p.requires_grad_(trainable)


def layer_param_groups(network: ConvNet, blocks: list[list[nn.Module]], lr: float, decay: float) -> list[dict[str, Any]]:
    """The head at ``lr``; conv block ``k`` from the end at ``lr * decay**k`` (earlier layers, smaller steps)."""
    groups = [{"params": list(network.head.parameters()), "lr": lr, "name": "head"}]
    for k, block in enumerate(reversed(blocks), start=1):
        params = block_parameters(block)
        if params:
            groups.append({"params": params, "lr": lr * decay**k, "name": f"block{len(blocks) - k + 1}"})
    return groups


def create_optimizer(groups: list[dict[str, Any]], settings: FinetuneConfig) -> torch.optim.Optimizer:
    """adam | sgd (momentum) | nesterov | rmsprop over param groups that carry their own lr."""
    wd, momentum = settings.weight_decay, settings.momentum
    if settings.optimizer == "adam":
        return torch.optim.Adam(groups, lr=settings.lr, weight_decay=wd)
    if settings.optimizer in ("sgd", "nesterov"):
        return torch.optim.SGD(groups, lr=settings.lr, momentum=momentum, nesterov=settings.optimizer == "nesterov",
                               weight_decay=wd)
    return torch.optim.RMSprop(groups, lr=settings.lr, alpha=0.9, weight_decay=wd)


# ---------------------------------------------------------------------------- lightning module


def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """Mean of ``T^2 * CE(softmax(logits / T), target)`` per row: cross-entropy for one-hot targets at
    T=1, Hinton's distillation loss for tempered teacher targets (T^2 keeps gradient scale)."""
    t = temperatures.to(torch.float32).view(-1, 1)
    log_probs = F.log_softmax(logits.float() / t, dim=1)
    return (-(targets.float() * log_probs).sum(dim=1) * t.view(-1) ** 2).mean()


def reseed_globals(seed: int) -> None:
    """Dropout and any other global draw: reseeded per epoch so a resumed epoch repeats exactly."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class ClassifierModule(L.LightningModule):
    """Trains an injected ``ConvNet`` end to end with staged unfreezing and layer-wise learning
    rates. Logs ``train/loss``, ``valid/logloss``, ``valid/acc`` (plus ``train/lr``,
    ``train/trainable_blocks``)."""

    def __init__(self, network: ConvNet, settings: FinetuneConfig, channels_last: bool = False):
        super().__init__()
        self.network = network
        self.settings = settings
        self.channels_last = channels_last
        self.blocks = conv_blocks(network)  # plain list: the layers are registered through `network`
        if channels_last:
            self.network.to(memory_format=torch.channels_last)
        self.save_hyperparameters({"finetune": settings.model_dump(mode="json"), "channels_last": channels_last})
        self._valid_sums = torch.zeros(3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.network(images)

    def on_train_epoch_start(self) -> None:
        count = trainable_block_count(self.current_epoch, self.settings, len(self.blocks))
        set_trainable_blocks(self.blocks, count)
        reseed_globals(epoch_seed(self.settings.seed, self.current_epoch, self.global_rank))
        self.log("train/trainable_blocks", float(count), on_step=False, on_epoch=True, sync_dist=False)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=False, on_epoch=True, sync_dist=False)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = soft_target_loss(self(batch["image"]), batch["target"], batch["temperature"])
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["image"]), sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._valid_sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss sum, correct, count

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        labels = batch["label"]
        keep = labels >= 0  # the padding row is -1
        logits = self(batch["image"]).float()[keep]
        labels = labels[keep]
        if len(labels):
            self._valid_sums += torch.stack([
                F.cross_entropy(logits, labels, reduction="sum").double(),
                (logits.argmax(1) == labels).sum().double(),
                torch.tensor(float(len(labels)), device=self.device, dtype=torch.float64),
            ])

    def on_validation_epoch_end(self) -> None:
        loss_sum, correct, count = self.trainer.strategy.reduce(self._valid_sums, reduce_op="sum").tolist()
        count = max(count, 1.0)
        self.log(MONITOR, loss_sum / count, prog_bar=True)  # already summed over ranks
        self.log("valid/acc", correct / count)

    def configure_optimizers(self) -> dict[str, Any]:
        s = self.settings
        optimizer = create_optimizer(layer_param_groups(self.network, self.blocks, s.lr, s.layer_lr_decay), s)
        scheduler = first_epoch_schedule(optimizer, s.first_epoch_lr, s.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


# ---------------------------------------------------------------------------- trainer


def uses_cuda(trainer_cfg: TrainerConfig) -> bool:
    if trainer_cfg.accelerator in ("gpu", "cuda"):
        return True
    return trainer_cfg.accelerator == "auto" and torch.cuda.is_available()


def resolve_precision(trainer_cfg: TrainerConfig) -> str:
    """``auto``: bf16-mixed on a GPU that has bf16 (16-mixed otherwise), fp32 on CPU."""
    if trainer_cfg.precision != "auto":
        return trainer_cfg.precision
    if not uses_cuda(trainer_cfg):
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def process_count(trainer_cfg: TrainerConfig) -> int:
    """How many training processes the config asks for (devices per node x nodes)."""
    devices = trainer_cfg.devices
    if isinstance(devices, str) and devices.strip() in ("auto", "-1"):
        per_node = torch.cuda.device_count() if uses_cuda(trainer_cfg) else 1
    elif isinstance(devices, str):
        per_node = len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    else:
        per_node = int(devices)
    return max(per_node, 1) * trainer_cfg.num_nodes


def build_strategy(trainer_cfg: TrainerConfig) -> str | Strategy:
    """DDP (asked for, or what ``auto`` picks for several processes) with ``find_unused_parameters``:
    staged unfreezing leaves frozen blocks without gradients, which plain DDP would wait for forever."""
    if trainer_cfg.strategy == "ddp" or (trainer_cfg.strategy == "auto" and process_count(trainer_cfg) > 1):
        return DDPStrategy(find_unused_parameters=True)
    return trainer_cfg.strategy


def interactive() -> bool:
    return sys.stderr.isatty()


class EpochSummary(Callback):
    """One line per epoch on stderr where there is no progress bar (DVC/Prefect logs)."""

    def __init__(self, name: str):
        self.name = name
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/loss", MONITOR, "valid/acc")}
        shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        print(f"[{self.name}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} step {trainer.global_step} "
              f"{shown} ({time.perf_counter() - self.start:.0f}s)", file=sys.stderr, flush=True)


def build_trainer(trainer_cfg: TrainerConfig, out_dir: Path, max_epochs: int, patience: int,
                  callbacks: Sequence[Callback] = (), label: str | None = None) -> tuple[L.Trainer, ModelCheckpoint]:
    """Lightning trainer from config: best (by valid/logloss) and last checkpoints in ``out_dir``,
    early stopping, CSV + TensorBoard logs, a rich progress bar on a terminal only (else epoch lines
    prefixed with ``label``, by default the folder's name)."""
    checkpoint = ModelCheckpoint(dirpath=out_dir, filename="best", monitor=MONITOR, mode="min", save_top_k=1,
                                 save_last=True, auto_insert_metric_name=False, enable_version_counter=False)
    stopping = EarlyStopping(monitor=MONITOR, mode="min", patience=patience)
    bars: list[Callback] = [RichProgressBar()] if interactive() else [EpochSummary(label or out_dir.name)]
    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=build_strategy(trainer_cfg),
        precision=resolve_precision(trainer_cfg),
        deterministic=trainer_cfg.deterministic,
        benchmark=trainer_cfg.benchmark,
        max_epochs=max_epochs,
        callbacks=[checkpoint, stopping, *bars, *callbacks],
        logger=[CSVLogger(save_dir=out_dir, name="logs", version=""),
                TensorBoardLogger(save_dir=out_dir, name="tb", version="", default_hp_metric=False)],
        enable_progress_bar=interactive(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        use_distributed_sampler=False,  # the samplers shard by rank themselves
    )
    return trainer, checkpoint


def quiet_training() -> None:
    quiet_lightning()
    for message in (".*smaller than the logging interval.*", ".*sync_dist=True.*", ".*Checkpoint directory.*exists.*",
                    ".*Experiment logs directory.*exists.*", ".*find_unused_parameters=True.*",
                    ".*is not writable.*", ".*isn't a `Sampler`.*"):
        warnings.filterwarnings("ignore", message=message)


# ---------------------------------------------------------------------------- resumable fit


def is_launcher_process() -> bool:
    """Rank 0 of the job, before and after Lightning launches the other ranks (which it marks
    with LOCAL_RANK/NODE_RANK; RANK under torchrun, SLURM_PROCID under SLURM)."""
    return all(int(os.environ.get(var, "0") or 0) == 0 for var in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"))


def fingerprint(settings: dict[str, Any], files: Sequence[Path] = (), modules: Sequence[ModuleType] = (),
                arrays: Sequence[np.ndarray] = ()) -> str:
    """A hash of what a training run depends on: settings, input files, source code, arrays."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in files:
        digest.update(file_sha256(path).encode())
    for module in modules:
        digest.update(Path(inspect.getsourcefile(module) or "").read_bytes())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def clear_run(out_dir: Path) -> None:
    for name in ("best.ckpt", "last.ckpt", RUN_FILE, MODEL_FILE):
        (out_dir / name).unlink(missing_ok=True)
    for log in (out_dir / "logs" / "metrics.csv",):
        log.unlink(missing_ok=True)


def plan_run(out_dir: Path, run_fingerprint: str, resume: bool) -> tuple[str, Path | None]:
    """``("reuse", best)`` for a complete run of this fingerprint, ``("resume", last)`` for an
    interrupted one, else ``("fresh", None)``. Only rank 0 changes files; other ranks read what it
    wrote before they were launched, and so reach the same answer."""
    state = read_json(out_dir / RUN_FILE) if (out_dir / RUN_FILE).exists() else {}
    same = resume and state.get("fingerprint") == run_fingerprint
    if same and state.get("status") == "complete" and (out_dir / "best.ckpt").exists():
        return "reuse", out_dir / "best.ckpt"
    if same and state.get("status") == "running" and (out_dir / "last.ckpt").exists():
        return "resume", out_dir / "last.ckpt"
    if is_launcher_process():
        out_dir.mkdir(parents=True, exist_ok=True)
        clear_run(out_dir)
        atomic_write_json(out_dir / RUN_FILE, {"fingerprint": run_fingerprint, "status": "running"})
    return "fresh", None


@dataclass
class FitOutcome:
    network: ConvNet  # the best checkpoint's weights, eval mode
    facts: dict[str, Any]
    device: torch.device  # where this rank predicts
    is_global_zero: bool


def load_module_weights(module: ClassifierModule, checkpoint: Path) -> None:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])


def fit_or_resume(module: ClassifierModule, data: ImageDataModule, trainer_cfg: TrainerConfig, out_dir: Path,
                  max_epochs: int, patience: int, run_fingerprint: str,
                  callbacks: Sequence[Callback] = (), label: str | None = None) -> FitOutcome:
    """Fit (fresh, resumed from last.ckpt, or reused when complete) and load the best weights."""
    mode, checkpoint_path = plan_run(out_dir, run_fingerprint, trainer_cfg.resume)
    if mode == "reuse":
        load_module_weights(module, checkpoint_path)
        facts = {**read_json(out_dir / RUN_FILE).get("facts", {}), "reused": True}
        device = torch.device("cuda") if uses_cuda(trainer_cfg) else torch.device("cpu")
        return FitOutcome(module.network.eval(), facts, device, is_launcher_process())

    trainer, checkpoint = build_trainer(trainer_cfg, out_dir, max_epochs, patience, callbacks, label)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=checkpoint_path)
    seconds = time.perf_counter() - start
    trainer.strategy.barrier("best checkpoint written")
    best_path = Path(checkpoint.best_model_path or out_dir / "last.ckpt")
    best = torch.load(best_path, map_location="cpu", weights_only=False)
    module.load_state_dict(best["state_dict"])
    facts = {
        "epochs": int(trainer.current_epoch),
        "best_epoch": int(best.get("epoch", -1)),
        "global_step": int(trainer.global_step),
        "best_valid_logloss_during_training": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "resumed": mode == "resume",
        "reused": False,
        "world_size": int(trainer.world_size),
        "precision": str(trainer.precision),
        "train_seconds": round(seconds, 3),
    }
    if trainer.is_global_zero:
        atomic_write_json(out_dir / RUN_FILE, {"fingerprint": run_fingerprint, "status": "complete", "facts": facts})
    return FitOutcome(module.network.eval(), facts, trainer.strategy.root_device, trainer.is_global_zero)


# ---------------------------------------------------------------------------- prediction


def distributed_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def predict_rows(network: nn.Module, table: ImageTable, rows: np.ndarray, target_hw: tuple[int, int], batch_size: int,
                 num_workers: int, device: torch.device, channels_last: bool, copy: int = 0,
                 augment: AugmentConfig | None = None, seed: int = 0) -> np.ndarray:
    """Softmax probabilities of ``table``'s ``rows``, bf16 autocast on CUDA. Copy 0 is the plain
    image; copy ``k >= 1`` with ``augment`` is augmented as the features stage's copy k (seed
    ``(seed, k, file name)``): a test-time augmentation pass."""
    network = network.to(device).eval()
    augmentation = build_augmentation(augment) if copy > 0 and augment is not None else None
    images = ImageRowsDataset(table.paths, target_hw, labels=table.labels, copies=[copy] * len(table),
                              augmentation=augmentation, seed=seed)
    dataset = Subset(images, rows.tolist())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        worker_init_fn=seed_worker, pin_memory=device.type == "cuda")
    cuda = device.type == "cuda"
    out = []
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = network(images)
        out.append(F.softmax(logits.float(), dim=1).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, NUM_CLASSES))


def predict_probs(network: nn.Module, table: ImageTable, target_hw: tuple[int, int], batch_size: int,
                  num_workers: int, device: torch.device, channels_last: bool = False, copy: int = 0,
                  augment: AugmentConfig | None = None, seed: int = 0) -> np.ndarray:
    """Probabilities for every row of ``table`` (copy ``copy``, see ``predict_rows``); under DDP each
    rank predicts every ``world``-th row and all ranks receive the whole result."""
    rank, world = distributed_world()
    rows = np.arange(rank, len(table), world)
    probs = predict_rows(network, table, rows, target_hw, batch_size, num_workers, device, channels_last,
                         copy, augment, seed)
    if world == 1:
        return probs
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, (rows, probs))
    result = np.zeros((len(table), NUM_CLASSES))
    for shard_rows, shard_probs in gathered:
        result[shard_rows] = shard_probs
    return result
