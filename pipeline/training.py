"""The one training path of every stage that trains (pretrain stand-in, dense head, finetune,
pseudo, ensemble members): one optimiser factory, one LightningModule (which receives its network),
one trainer factory, one checkpoint format, resumable fits and (distributed) prediction.

One loss covers every batch: ``T^2 * cross_entropy(softmax(logits / T), target)``, plain
cross-entropy for a labelled row, distillation for tempered pseudo-labels (batches: see
``pipeline.datamodules``).

Staged unfreezing. The backbone is split into blocks (``pipeline.models.backbone_blocks``: VGG's 5
conv blocks, or timm's own block grouping). The head and the last ``unfreeze_blocks`` blocks train
first; every ``unfreeze_every`` epochs one more block joins. Every parameter is in the optimiser from
the start (block ``k`` from the end at ``lr * layer_lr_decay**k``); a frozen one has no gradient, so
the optimiser skips it, and its batchnorm stays in eval mode. Epoch 0 runs every group at
``first_epoch_lr / lr`` of its rate (the course: a low first epoch).

Distributed. Lightning DDP re-executes the entry point per rank, so every rank runs the whole stage
function: only the launcher process (rank 0) writes files, and prediction after a fit is sharded
over the ranks and gathered, so every rank holds the same probabilities.

Resume. ``<ckpt_dir>/run.json`` holds a fingerprint of the config, inputs and code. A run of the
same fingerprint that was interrupted resumes from ``last.ckpt``, which ``ResumeCheckpoint`` writes at
the end of every epoch and, within a long epoch, every ``CHECKPOINT_EVERY_S`` seconds. A resumed run
continues where the checkpoint was taken: weights, optimiser, LR schedule, early-stopping and
best-checkpoint state, loop counters, the epoch's partial training loss, and the sampler's position
(``ResumableLoader``: the epoch's batch order is a function of ``(seed, epoch)``, so the batches
already trained are skipped without being loaded). Augmentation is seeded by ``(seed, copy, image)``
and dropout by ``(seed, epoch, batch)``, so a resumed run ends with the same weights as an
uninterrupted one (tests/test_resume.py). Checkpoints are written atomically (``AtomicCheckpointIO``);
one that does not load (a foreign or damaged file) means starting over, said on stderr. A complete
run is reused (its kept checkpoint loaded) without training; anything else starts fresh. Checkpoints
must be on a file system every rank sees (multi-node).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import itertools
import json
import logging
import os
import random
import sys
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, Checkpoint, EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset

from pipeline.config import AugmentConfig, TrainerConfig
from pipeline.console import PROGRESS_EVERY_S, verbose
from pipeline.data import ImageRowsDataset, build_augmentation, seed_worker
from pipeline.datamodules import epoch_seed
from pipeline.errors import StageError
from pipeline.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    read_json,
)
from pipeline.tables import ImageTable

MONITOR = "valid/logloss"
RUN_FILE = "run.json"
MODEL_FILE = "model.pt"
LAST_FILE = "last.ckpt"
BEST_FILE = "best.ckpt"
RUN_LOG_FILE = "log.jsonl"
# Within an epoch, last.ckpt is rewritten once this many seconds have passed since it was last written
# (a VGG-16 checkpoint with Adam state is ~1.5 GB: a few seconds to write).
CHECKPOINT_EVERY_S = 300.0


# ---------------------------------------------------------------------------- checkpoints


def save_network(path: Path, network: nn.Module, meta: dict[str, Any]) -> Path:
    """The one checkpoint format of every stage's network (pretrain backbone, dense head, fine-tuned
    CNN): ``{"state_dict", "meta"}``, written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    # Through a buffer: torch.save names the archive's root after the file it writes, and a temp
    # file's random name would make equal weights differ byte-wise (DVC's run cache keys on bytes).
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "meta": meta}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_network_file(path: Path | str, writer: str = "stage that writes it") -> dict[str, Any]:
    """``{"state_dict", "meta"}`` saved by ``save_network``; a StageError naming the file when it is
    missing or unreadable (a truncated file would otherwise fail with a pickle traceback)."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} not found: run the {writer} stage first")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign bytes: torch raises several kinds
        raise StageError(f"{path}: unreadable checkpoint ({type(err).__name__}); delete it and rerun the stage "
                         "that writes it") from None
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise StageError(f"{path}: not a checkpoint of this pipeline (no state_dict)")
    return blob


def load_network_state(path: Path, writer: str = "stage that writes it") -> dict[str, torch.Tensor]:
    return load_network_file(path, writer)["state_dict"]


# ---------------------------------------------------------------------------- optimisation


@dataclass(frozen=True)
class TrainSettings:
    """What the one optimiser factory and the one LightningModule need, whichever stage trains:
    the head (``head`` section), fine-tuning and pseudo (``finetune``), the pretrain stand-in."""

    optimizer: str = "adam"  # adam | adamw | sgd | nesterov | rmsprop
    lr: float = 1e-3
    first_epoch_lr: float | None = None  # None: no low first epoch
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    layer_lr_decay: float = 1.0  # block k from the end at lr * decay**k
    unfreeze_blocks: int | None = None  # None: every block trains from the start
    unfreeze_every: int = 0
    schedule: str = "first_epoch"  # first_epoch (constant after a low epoch 0) | onecycle
    # Keep every batchnorm layer's running statistics as they are (eval mode) while training: the
    # network then computes at evaluation what it computed in training, and a fine-tune starts exactly
    # where its head left it (train-mode statistics on augmented batches shift the features the head
    # was fitted on). The affine weights still train. True: every epoch; "first_epoch": epoch 0 only
    # (the low-learning-rate one), then the statistics follow the training data.
    freeze_bn_stats: bool | str = False

    @classmethod
    def from_section(cls, section: Any, **changes: Any) -> TrainSettings:
        """From a config section (``cfg.head``, ``cfg.finetune``): the fields it has, then ``changes``."""
        names = {f.name for f in fields(cls)}
        values = {name: getattr(section, name) for name in names if hasattr(section, name)}
        return replace(cls(**values), **changes)


def create_optimizer(groups: list[dict[str, Any]], settings: TrainSettings) -> torch.optim.Optimizer:
    """adam | adamw | sgd (momentum) | nesterov | rmsprop over param groups that carry their own lr."""
    wd, momentum = settings.weight_decay, settings.momentum
    if settings.optimizer == "adam":
        return torch.optim.Adam(groups, lr=settings.lr, weight_decay=wd)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=wd)
    if settings.optimizer in ("sgd", "nesterov"):
        return torch.optim.SGD(groups, lr=settings.lr, momentum=momentum, nesterov=settings.optimizer == "nesterov",
                               weight_decay=wd)
    if settings.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=settings.lr, alpha=0.9, weight_decay=wd)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}")


def first_epoch_schedule(optimizer: torch.optim.Optimizer, first_epoch_lr: float, lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """``first_epoch_lr`` during epoch 0, ``lr`` afterwards (stepped once per epoch)."""
    ratio = first_epoch_lr / lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: ratio if epoch == 0 else 1.0)


def block_parameters(block: list[nn.Module]) -> list[nn.Parameter]:
    return [p for layer in block for p in layer.parameters()]


def trainable_block_count(epoch: int, settings: TrainSettings, n_blocks: int) -> int:
    """How many blocks (counted from the last) train in ``epoch`` under staged unfreezing."""
    if settings.unfreeze_blocks is None:
        return n_blocks
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


def batchnorm_frozen(setting: bool | str, epoch: int) -> bool:
    """Whether ``freeze_bn_stats`` (True, False or "first_epoch") keeps the statistics in ``epoch``."""
    return setting is True or (setting == "first_epoch" and epoch == 0)


def freeze_batchnorm_statistics(network: nn.Module) -> None:
    """Every batchnorm layer in eval mode: normalises with, and no longer updates, its running statistics."""
    for module in network.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.SyncBatchNorm):
            module.eval()


def layer_param_groups(network: nn.Module, blocks: list[list[nn.Module]], lr: float, decay: float) -> list[dict[str, Any]]:
    """Every parameter outside ``blocks`` (the head) at ``lr``; block ``k`` from the end at
    ``lr * decay**k`` (earlier layers, smaller steps)."""
    in_blocks = {id(p) for block in blocks for p in block_parameters(block)}
    groups = [{"params": [p for p in network.parameters() if id(p) not in in_blocks], "lr": lr, "name": "head"}]
    for k, block in enumerate(reversed(blocks), start=1):
        params = block_parameters(block)
        if params:
            groups.append({"params": params, "lr": lr * decay**k, "name": f"block{len(blocks) - k + 1}"})
    return groups


# ---------------------------------------------------------------------------- lightning module


def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """Mean of ``T^2 * CE(softmax(logits / T), target)`` per row: cross-entropy for one-hot targets at
    T=1, Hinton's distillation loss for tempered teacher targets (T^2 keeps gradient scale)."""
    t = temperatures.to(torch.float32).view(-1, 1)
    log_probs = F.log_softmax(logits.float() / t, dim=1)
    return (-(targets.float() * log_probs).sum(dim=1) * t.view(-1) ** 2).mean()


def reseed_globals(seed: int) -> None:
    """Dropout and any other global draw: reseeded per batch so a resumed epoch repeats exactly."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class ClassifierModule(L.LightningModule):
    """The one LightningModule: trains an injected network (a ConvNet on images, or a dense head on
    cached features) on batch dicts (``pipeline.datamodules``), with optional staged unfreezing of
    ``blocks`` and layer-wise learning rates. Logs ``train/loss``, ``valid/logloss``, ``valid/acc``
    (plus ``train/lr``, ``train/trainable_blocks``). A non-finite training loss stops the run with
    an error instead of writing NaN weights."""

    def __init__(self, network: nn.Module, settings: TrainSettings, blocks: Sequence[list[nn.Module]] = (),
                 channels_last: bool = False):
        super().__init__()
        self.network = network
        self.settings = settings
        self.channels_last = channels_last
        self.blocks = list(blocks)  # plain list: the layers are registered through `network`
        if channels_last:
            self.network.to(memory_format=torch.channels_last)
        self.save_hyperparameters({"settings": asdict(settings), "channels_last": channels_last})
        self._valid_sums = torch.zeros(3)
        self._train_sums = torch.zeros(2, dtype=torch.float64)  # this rank's epoch so far: loss x rows, rows
        self._epoch_start: dict[str, float] = {}  # train/lr and train/trainable_blocks as the epoch began

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.network(inputs)

    def on_train_start(self) -> None:
        # A run resumed within an epoch continues without on_train_epoch_start: set the epoch's modes here.
        self.set_epoch_modes()

    def on_train_epoch_start(self) -> None:
        count = self.set_epoch_modes()
        self._train_sums = torch.zeros(2, dtype=torch.float64)
        lr = float(self.optimizers().param_groups[0]["lr"])
        self._epoch_start = {"train/trainable_blocks": float(count), "train/lr": lr}

    def set_epoch_modes(self) -> int:
        """Train mode (Lightning restores the last epoch's modes after validation), the epoch's trainable
        blocks and batchnorm statistics; returns how many blocks train."""
        self.network.train()
        count = trainable_block_count(self.current_epoch, self.settings, len(self.blocks))
        set_trainable_blocks(self.blocks, count)
        if batchnorm_frozen(self.settings.freeze_bn_stats, self.current_epoch):
            freeze_batchnorm_statistics(self.network)
        return count

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = soft_target_loss(self(batch["input"]), batch["target"], batch["temperature"])
        if not torch.isfinite(loss):
            raise StageError(f"training loss is {float(loss)} at epoch {self.current_epoch}, batch {batch_idx}: "
                             "non-finite inputs or a learning rate too high; nothing was written")
        rows = len(batch["input"])
        self._train_sums = self._train_sums.to(loss.device) + torch.stack(
            [loss.detach().double() * rows, torch.tensor(float(rows), device=loss.device, dtype=torch.float64)])
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout (and any other global draw) from (seed, epoch, batch, rank) alone: a resumed epoch
        # repeats exactly, whatever else drew from the global generators before it (Lightning's restore
        # and the loader's worker seeds draw at other points than in an uninterrupted run).
        reseed_globals(epoch_seed(self.settings.seed, self.current_epoch, batch_idx, self.global_rank))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # The epoch's values, logged once at its last batch from sums the checkpoints carry: Lightning's
        # own epoch accumulation would restart empty in a run resumed within the epoch.
        if batch_idx + 1 < self.trainer.num_training_batches:
            return
        loss_sum, rows = self.trainer.strategy.reduce(self._train_sums.to(self.device), reduce_op="sum").tolist()
        self.log("train/loss", loss_sum / max(rows, 1.0), on_step=False, on_epoch=True, batch_size=1)
        for name, value in self._epoch_start.items():
            self.log(name, value, on_step=False, on_epoch=True, batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["epoch_in_progress"] = {"train_sums": self._train_sums.cpu(),
                                           "epoch_start": dict(self._epoch_start)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "epoch_in_progress" in checkpoint:
            state = checkpoint["epoch_in_progress"]
            self._train_sums, self._epoch_start = state["train_sums"].double(), dict(state["epoch_start"])

    def on_validation_epoch_start(self) -> None:
        self._valid_sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss sum, correct, count

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        labels = batch["label"]
        keep = labels >= 0  # the padding row is -1
        logits = self(batch["input"]).float()[keep]
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
        if s.schedule == "onecycle":
            peaks = [g["lr"] for g in optimizer.param_groups]
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, pct_start=0.25,
                                                            total_steps=max(int(self.trainer.estimated_stepping_batches), 1))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        scheduler = first_epoch_schedule(optimizer, s.first_epoch_lr or s.lr, s.lr)
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


class EpochSummary:
    """Epoch lines on stderr where there is no progress bar (DVC/Prefect logs): every epoch when
    verbose, else at most one per ``PROGRESS_EVERY_S`` seconds (a long stage still shows progress).
    ``ResumeCheckpoint`` shows each once the epoch's checkpoint is written: after a line, a killed run
    resumes after that epoch."""

    def __init__(self, name: str):
        self.name = name
        self.start = self.shown = time.perf_counter()

    def show(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        now = time.perf_counter()
        if not verbose() and now - self.shown < PROGRESS_EVERY_S:
            return
        self.shown = now
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/loss", MONITOR, "valid/acc")}
        shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        print(f"[{self.name}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} step {trainer.global_step} "
              f"{shown} ({time.perf_counter() - self.start:.0f}s)", file=sys.stderr, flush=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer made atomic: a checkpoint goes to a temp file next to its target,
    is flushed to disk and renamed onto it, so a kill mid-write leaves the previous checkpoint whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())


class SkipBatches(Sampler):
    """The batches of ``sampler`` (a batch sampler, or a sampler of whole batches) from the ``start``-th
    on: the skipped batches' indices are drawn, their rows never loaded."""

    def __init__(self, sampler: Sampler, start: int):
        self.sampler, self.start = sampler, int(start)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.sampler), self.start, None)


def loader_starting_at(loader: DataLoader, start: int) -> DataLoader:
    """``loader`` (its dataset, sampler, workers and collation) from its ``start``-th batch on."""
    if loader.batch_sampler is not None:
        batching: dict[str, Any] = {"batch_sampler": SkipBatches(loader.batch_sampler, start)}
    else:  # batch_size=None: the sampler itself yields each batch's rows
        batching = {"sampler": SkipBatches(loader.sampler, start), "batch_size": None}
    return DataLoader(loader.dataset, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                      prefetch_factor=loader.prefetch_factor, pin_memory_device=loader.pin_memory_device,
                      in_order=loader.in_order, **batching)


def sampler_epoch(loader: DataLoader) -> int | None:
    """The epoch the loader's (batch) sampler is set to, None for a sampler without epochs."""
    for sampler in (loader.batch_sampler, loader.sampler):
        epoch = getattr(sampler, "epoch", None)
        if epoch is not None:
            return int(epoch)
    return None


class ResumableLoader:
    """A training DataLoader that a run resumed within an epoch (``resume``) continues with the next
    batch of that epoch's order: the samplers draw an epoch's order from ``(seed, epoch)`` alone, and
    the batches already trained are skipped without being loaded. Iterating starts at the first batch,
    not at ``iter()``: Lightning creates a resumed run's first iterator before it sets the sampler's
    epoch, and a loader with workers draws its first indices as soon as its iterator exists."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches done) for the next iteration

    @property
    def sampler(self) -> Any:  # Lightning sets each epoch on these
        return self.loader.sampler

    @property
    def batch_sampler(self) -> Any:
        return self.loader.batch_sampler

    def __len__(self) -> int:
        return len(self.loader)

    def resume(self, epoch: int, batches_done: int) -> None:
        self.resume_at = (int(epoch), int(batches_done))

    def __iter__(self) -> Iterator[Any]:
        return self.batches()

    def batches(self) -> Iterator[Any]:
        resume, self.resume_at = self.resume_at, None
        epoch = sampler_epoch(self.loader)
        skip = resume[1] if resume is not None and epoch in (None, resume[0]) else 0
        yield from loader_starting_at(self.loader, skip) if skip else self.loader


def resumable(make_loader: Any) -> ResumableLoader:
    return ResumableLoader(make_loader())


@contextmanager
def resumable_training_loader(data: L.LightningDataModule) -> Iterator[None]:
    """``data.train_dataloader()`` returns its loader wrapped in a ResumableLoader while the block runs."""
    before = vars(data).get("train_dataloader")
    data.train_dataloader = functools.partial(resumable, data.train_dataloader)  # type: ignore[method-assign]
    try:
        yield
    finally:
        if before is None:
            del data.train_dataloader
        else:
            data.train_dataloader = before  # type: ignore[method-assign]


class RunLog(Logger):
    """Every row the run logs, appended to ``<ckpt_dir>/log.jsonl`` as it is logged (rank 0). A resumed
    run logs again the rows of the part of the run its checkpoint holds into its other loggers, so its
    CSV log (the report's learning curves) and TensorBoard events cover the whole run: Lightning's CSV
    logger starts its file afresh, DVC deletes the folder, and a kill loses the rows not yet flushed.
    (A kill in the instant between an epoch's checkpoint and the epoch's training row loses that row.)"""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @property
    def name(self) -> str:
        return "run_log"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {"step": step, **{k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}}
        with self.path.open("a") as file:
            file.write(json.dumps(row) + "\n")

    def rows_until(self, position: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows logged up to a checkpoint's position: its finished epochs' rows, and within the epoch
        it stopped in, step rows before its step."""
        rows = []
        for line in self.path.read_text().splitlines() if self.path.exists() else ():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line the kill cut short
                continue
            epoch = row.get("epoch", -1)
            if epoch < position["epoch"] or (epoch == position["epoch"] and (
                    position["epoch_done"] or (row.get("step") or 0) < position["global_step"])):
                rows.append(row)
        return rows

    def restore(self, trainer: L.Trainer, position: dict[str, Any]) -> None:
        """Log the rows up to ``position`` into the trainer's other loggers, and keep only them here."""
        rows = self.rows_until(position)
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))
        for row in rows:
            step = row.pop("step")
            for logger in trainer.loggers:
                if logger is not self:
                    logger.log_metrics(row, step)


class ResumeCheckpoint(Checkpoint):
    """Writes ``last.ckpt``, what an interrupted run resumes from: at the end of every training epoch
    (after validation; Lightning runs checkpoint callbacks last, so early stopping's and the best
    checkpoint's state for the epoch are in it), and within an epoch once ``every_s`` seconds
    (default ``CHECKPOINT_EVERY_S``) have passed since the last write, rank 0's clock deciding for every
    rank. A resumed run says on stderr where it continues; ``summary`` shows each epoch's line once its
    checkpoint is written."""

    def __init__(self, ckpt_dir: Path, label: str, every_s: float | None = None,
                 summary: EpochSummary | None = None):
        self.path = Path(ckpt_dir) / LAST_FILE
        self.run_log = RunLog(Path(ckpt_dir) / RUN_LOG_FILE)  # one of the trainer's loggers
        self.label = label
        self.summary = summary  # shown after each epoch's checkpoint
        self.every_s = CHECKPOINT_EVERY_S if every_s is None else float(every_s)
        self.written_at = time.monotonic()
        self.position: dict[str, Any] = {}  # where the checkpoint being written stands
        self.restored: dict[str, Any] | None = None  # where the checkpoint resumed from stood

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.written_at = time.monotonic()
        if self.restored is None:
            return
        # Lightning does not keep early stopping's verdict; without it a run killed after its last
        # epoch's checkpoint would train one epoch more than the uninterrupted run.
        trainer.should_stop = trainer.should_stop or bool(self.restored.get("should_stop"))
        if not self.restored.get("epoch_done"):
            loader = trainer.train_dataloader
            if not isinstance(loader, ResumableLoader):
                raise TypeError(f"resuming within an epoch needs a ResumableLoader, not {type(loader).__name__}")
            loader.resume(self.restored["epoch"], self.restored["batches"])
        if trainer.is_global_zero:
            self.run_log.restore(trainer, self.restored)
            print(f"[{self.label}] {self.resume_note(trainer)}", file=sys.stderr, flush=True)

    def resume_note(self, trainer: L.Trainer) -> str:
        at, n = self.restored or {}, trainer.max_epochs
        epoch, batches = int(at.get("epoch", 0)), int(at.get("batches") or 0)
        if not at.get("epoch_done"):
            return (f"resuming from {self.path} within epoch {epoch + 1}/{n}: batches 1-{batches} of "
                    f"{at.get('epoch_batches', '?')} done, continuing with batch {batches + 1}")
        if at.get("should_stop") or (n is not None and n >= 0 and epoch + 1 >= n):
            return (f"resuming from {self.path}: training had ended after epoch {epoch + 1}/{n}, "
                    "nothing left to train")
        left = f"epoch {n}/{n}" if epoch + 2 == n else f"epochs {epoch + 2}-{n} of {n}"
        return f"resuming from {self.path} after epoch {epoch + 1}/{n}: training {left}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's end writes one next
        due = time.monotonic() - self.written_at >= self.every_s
        if trainer.world_size > 1:
            due = trainer.strategy.broadcast(due, src=0)
        if due:
            self.write(trainer, batches_done=batch_idx + 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, batches_done=None)
        if self.summary is not None:
            self.summary.show(trainer)

    def write(self, trainer: L.Trainer, batches_done: int | None) -> None:
        """Write last.ckpt: within the epoch after ``batches_done`` batches, or (None) at its end."""
        self.position = {"epoch": int(trainer.current_epoch), "epoch_done": batches_done is None,
                         "batches": batches_done, "epoch_batches": trainer.num_training_batches,
                         "global_step": int(trainer.global_step), "should_stop": bool(trainer.should_stop)}
        trainer.save_checkpoint(self.path)
        self.written_at = time.monotonic()

    def state_dict(self) -> dict[str, Any]:
        return dict(self.position)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = dict(state_dict)


def build_trainer(trainer_cfg: TrainerConfig, out_dir: Path, max_epochs: int, patience: int,
                  callbacks: Sequence[Callback] = (), label: str | None = None,
                  monitor: bool = True, ckpt_dir: Path | None = None) -> tuple[L.Trainer, ModelCheckpoint | None]:
    """Lightning trainer from config: the best checkpoint (by valid/logloss) and ``last.ckpt``
    (``ResumeCheckpoint``) in ``ckpt_dir`` (default ``out_dir``), written atomically; early stopping;
    CSV + TensorBoard logs in ``out_dir``; a rich progress bar on a terminal only (else epoch lines
    prefixed with ``label``, by default the folder's name). Without ``monitor`` (a cross-validation
    fold model, whose held-out rows must not steer it) there is no validation loop, no early stopping
    and no best checkpoint: it trains exactly ``max_epochs``. Returns the trainer and the best
    checkpoint's callback (None without ``monitor``)."""
    ckpt_dir = ckpt_dir or out_dir
    label = label or out_dir.name
    best = None
    if monitor:
        best = ModelCheckpoint(dirpath=ckpt_dir, filename=Path(BEST_FILE).stem, monitor=MONITOR, mode="min",
                               save_top_k=1, save_last=False, auto_insert_metric_name=False,
                               enable_version_counter=False)
    stopping = [EarlyStopping(monitor=MONITOR, mode="min", patience=patience)] if monitor else []
    bars: list[Callback] = [RichProgressBar()] if interactive() else []
    resume = ResumeCheckpoint(ckpt_dir, label, summary=None if interactive() else EpochSummary(label))
    checkpoints: list[Callback] = [*([best] if best is not None else []), resume]
    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=build_strategy(trainer_cfg),
        precision=resolve_precision(trainer_cfg),
        deterministic=trainer_cfg.deterministic,
        benchmark=trainer_cfg.benchmark,
        max_epochs=max_epochs,
        callbacks=[*stopping, *bars, *callbacks, *checkpoints],
        plugins=[AtomicCheckpointIO()],
        limit_val_batches=None if monitor else 0,
        logger=[CSVLogger(save_dir=out_dir, name="logs", version=""),
                TensorBoardLogger(save_dir=out_dir, name="tb", version="", default_hp_metric=False), resume.run_log],
        enable_progress_bar=interactive(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        use_distributed_sampler=False,  # the samplers shard by rank themselves
    )
    return trainer, best


def quiet_training() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # ResumeCheckpoint resumes the training loader within an epoch itself (ResumableLoader).
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    for message in (".*does not have many workers.*", ".*LeafSpec.*", ".*exists and is not empty.*"):
        warnings.filterwarnings("ignore", message=message)
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


def clear_run(ckpt_dir: Path, out_dir: Path | None = None) -> None:
    """Forget a previous run: its checkpoints and state in ``ckpt_dir``, its weights and CSV log in ``out_dir``."""
    for folder in {ckpt_dir, out_dir or ckpt_dir}:
        for name in (BEST_FILE, LAST_FILE, RUN_FILE, RUN_LOG_FILE, MODEL_FILE):
            (folder / name).unlink(missing_ok=True)
        (folder / "logs" / "metrics.csv").unlink(missing_ok=True)
    remove_partial_checkpoints(ckpt_dir)


def remove_partial_checkpoints(ckpt_dir: Path) -> None:
    """The temp files of checkpoint writes a kill interrupted (``AtomicCheckpointIO``)."""
    for path in ckpt_dir.glob(".*.tmp*") if ckpt_dir.is_dir() else ():
        path.unlink(missing_ok=True)


def plan_run(ckpt_dir: Path, run_fingerprint: str, resume: bool, out_dir: Path | None = None,
             keep: str = "best") -> tuple[str, Path | None]:
    """``("reuse", checkpoint)`` for a complete run of this fingerprint (its ``keep`` checkpoint: best
    or last), ``("resume", last)`` for an interrupted one, else ``("fresh", None)``; the run's state
    and checkpoints live in ``ckpt_dir``. A checkpoint that does not load is not trusted: the run
    starts over and says why on stderr. Only rank 0 changes files or speaks; other ranks read what it
    wrote before they were launched, and so reach the same answer."""
    launcher = is_launcher_process()
    state = read_json(ckpt_dir / RUN_FILE) if (ckpt_dir / RUN_FILE).exists() else {}
    status = state.get("status") if resume and state.get("fingerprint") == run_fingerprint else None
    if launcher:
        remove_partial_checkpoints(ckpt_dir)
    if status in ("complete", "running"):
        if status == "complete":
            mode, path = "reuse", ckpt_dir / (BEST_FILE if keep == "best" else LAST_FILE)
        else:
            mode, path = "resume", ckpt_dir / LAST_FILE
        problem = checkpoint_problem(path)
        if problem is None:
            return mode, path
        if launcher:
            what = "the complete run's checkpoint" if mode == "reuse" else "the interrupted run's checkpoint"
            print(f"{path}: {what} {problem}: starting over", file=sys.stderr, flush=True)
    if launcher:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        clear_run(ckpt_dir, out_dir)
        atomic_write_json(ckpt_dir / RUN_FILE, {"fingerprint": run_fingerprint, "status": "running"})
    return "fresh", None


def checkpoint_problem(path: Path) -> str | None:
    """Why a Lightning checkpoint cannot be trusted (None: it can): missing, not a whole torch archive
    (cut short by a full disk, or by a kill mid-write of a writer without ``AtomicCheckpointIO``), a
    record whose bytes fail the archive's CRC-32, or contents that do not unpickle into a checkpoint.
    Reads the file once; the tensors are mapped, not loaded."""
    if not path.exists():
        return "is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "is not a torch archive"
            damaged = archive.testzip()
        if damaged is not None:
            return f"is damaged (record {damaged} fails its checksum)"
        blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # as Lightning loads it
    except Exception as err:  # a cut or foreign file: zipfile and torch raise several kinds
        return f"does not load ({type(err).__name__}: {err})"
    if not isinstance(blob, dict) or "state_dict" not in blob:
        return "is not a Lightning checkpoint (no state_dict)"
    return None


def checkpoint_loads(path: Path) -> bool:
    return checkpoint_problem(path) is None


@dataclass
class FitOutcome:
    network: nn.Module  # the best checkpoint's weights, eval mode
    facts: dict[str, Any]
    device: torch.device  # where this rank predicts
    is_global_zero: bool


def load_module_weights(module: ClassifierModule, checkpoint: Path) -> None:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])


def fit_or_resume(module: ClassifierModule, data: L.LightningDataModule, trainer_cfg: TrainerConfig, out_dir: Path,
                  max_epochs: int, patience: int, run_fingerprint: str,
                  callbacks: Sequence[Callback] = (), label: str | None = None, keep: str = "best",
                  monitor: bool = True, ckpt_dir: Path | None = None) -> FitOutcome:
    """Fit (fresh, resumed from last.ckpt, or reused when complete) and load the ``keep`` weights:
    ``best`` (lowest valid/logloss) or ``last`` (a schedule that anneals to its end, whose validation
    is only reported). Without ``monitor``: no validation at all, exactly ``max_epochs``, the last weights.
    Checkpoints and the run's state go to ``ckpt_dir`` (default ``out_dir``): a DVC output that is
    not persistent is deleted before its stage runs, so a fold model keeps them outside it to resume."""
    keep = keep if monitor else "last"
    ckpt_dir = ckpt_dir or out_dir
    mode, checkpoint_path = plan_run(ckpt_dir, run_fingerprint, trainer_cfg.resume, out_dir, keep)
    if mode == "reuse":
        load_module_weights(module, checkpoint_path)
        facts = {**read_json(ckpt_dir / RUN_FILE).get("facts", {}), "reused": True}
        device = torch.device("cuda") if uses_cuda(trainer_cfg) else torch.device("cpu")
        return FitOutcome(module.network.eval(), facts, device, is_launcher_process())

    trainer, best = build_trainer(trainer_cfg, out_dir, max_epochs, patience, callbacks, label, monitor, ckpt_dir)
    start = time.perf_counter()
    with resumable_training_loader(data):
        trainer.fit(module, datamodule=data, ckpt_path=checkpoint_path)
    seconds = time.perf_counter() - start
    trainer.strategy.barrier("best checkpoint written")
    if keep == "best":
        kept = Path(best.best_model_path) if best is not None and best.best_model_path else ckpt_dir / LAST_FILE
        blob = torch.load(kept, map_location="cpu", weights_only=False)
        module.load_state_dict(blob["state_dict"])
    else:  # the weights in memory are the last epoch's
        blob = {"epoch": int(trainer.current_epoch) - 1}
    best_score = best.best_model_score if best is not None else None
    facts = {
        "epochs": int(trainer.current_epoch),
        "best_epoch": int(blob.get("epoch", -1)),
        "global_step": int(trainer.global_step),
        "best_valid_logloss_during_training": float(best_score) if best_score is not None else None,
        "resumed": mode == "resume",
        "reused": False,
        "world_size": int(trainer.world_size),
        "precision": str(trainer.precision),
        "train_seconds": round(seconds, 3),
    }
    if trainer.is_global_zero:
        atomic_write_json(ckpt_dir / RUN_FILE, {"fingerprint": run_fingerprint, "status": "complete", "facts": facts})
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
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


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
    result = np.zeros((len(table), max(p.shape[1] for _, p in gathered)))
    for shard_rows, shard_probs in gathered:
        result[shard_rows] = shard_probs
    return result


@torch.no_grad()
def predict_features(network: nn.Module, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities of a network on cached feature rows (the dense head), on its device."""
    network = network.eval()
    device = next(network.parameters()).device
    out = [F.softmax(network(torch.as_tensor(features[i:i + batch_size]).to(device).float()), dim=1).cpu()
           for i in range(0, len(features), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros((0, 0))
