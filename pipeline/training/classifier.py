"""The one LightningModule (``ClassifierModule``), which receives its network, and staged unfreezing.

One loss covers every batch: ``T^2 * cross_entropy(softmax(logits / T), target)``, plain
cross-entropy for a labelled row, distillation for tempered pseudo-labels (batches: see
``pipeline.training.datamodules``).

Staged unfreezing. The backbone is split into blocks (``pipeline.models.backbone_blocks``: VGG's 5
conv blocks, or timm's own block grouping). The head and the last ``unfreeze_blocks`` blocks train
first; every ``unfreeze_every`` epochs one more block joins. Every parameter is in the optimiser from
the start (block ``k`` from the end at ``lr * layer_lr_decay**k``); a frozen one has no gradient, so
the optimiser skips it, and its batchnorm stays in eval mode. Epoch 0 runs every group at
``first_epoch_lr / lr`` of its rate (the fast.ai course: a low first epoch).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import StageError
from pipeline.training.datamodules import epoch_seed
from pipeline.training.optim import TrainSettings, create_optimizer, first_epoch_schedule, layer_param_groups

MONITOR = "valid/logloss"


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
