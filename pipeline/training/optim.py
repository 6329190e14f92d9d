"""Optimisation settings and the one optimiser factory: ``TrainSettings`` from any config section,
the optimiser over layer-wise param groups (block ``k`` from the end at ``lr * layer_lr_decay**k``),
the low-first-epoch schedule."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import nn


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
