"""Prediction: a fitted network's softmax probabilities on images (plain or an augmented copy,
sharded over DDP ranks and gathered) or on cached feature rows, and test-time augmentation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from pipeline.config import AugmentConfig, Config
from pipeline.convfeatures.embed import softmax_batches
from pipeline.data import ImageRowsDataset, build_augmentation, seed_worker
from pipeline.metrics import keep_tta_if_better
from pipeline.training.folds import monitors_held_out
from pipeline.training.tables import ImageTable
from pipeline.training.trainer import FitOutcome


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
    return softmax_batches(network, loader, device, channels_last)


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


# ---------------------------------------------------------------------------- fine-tuned CNNs, TTA


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
