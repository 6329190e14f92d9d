"""Lightning DataModules and batch samplers for every training stage.

Images (``ImageDataModule``: finetune, pseudo, members, pretrain). A training batch is a dict:
``input`` (uint8 NCHW), ``target`` (a class distribution: one-hot for labelled rows, the teacher's
probabilities for soft pseudo-labels), ``pseudo`` (bool) and ``temperature`` (1, or the distillation
temperature for pseudo rows). Every batch is full: ``MixedBatchSampler`` composes it of exactly
``round(fraction * batch_size)`` pseudo rows and the rest labelled (0 pseudo rows without a pseudo
set). Train row ``c * n + i`` is augmented copy ``c + 1`` of image ``i`` (pipeline.data: a pure
function of seed, copy and file name); epoch ``e`` uses copy ``e % copies``, so a resumed epoch sees
the same pixels as the original. Validation and test rows are never augmented.

Cached features (``CachedFeaturesDataModule``: the dense head). The same batch dicts, with float
features as ``input``; each epoch sees every train image once, as one of its cached copies.

Distributed. Samplers shard batches by rank themselves (``use_distributed_sampler=False``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from pipeline.config import AugmentConfig
from pipeline.convfeatures.cache import FeatureSplit
from pipeline.data import ImageRowsDataset, build_augmentation, seed_worker
from pipeline.errors import StageError
from pipeline.training.tables import ImageTable, one_hot

# ---------------------------------------------------------------------------- images


class TargetRows(Dataset):
    """Training rows with target distributions. Row ``r`` is augmented copy ``r // n + 1`` of image
    ``r % n`` (copy-major, like the feature cache); without augmentation every copy is the plain image."""

    def __init__(self, table: ImageTable, targets: np.ndarray, target_hw: tuple[int, int], copies: int,
                 augmentation: Any | None, seed: int, pseudo: bool, temperature: float = 1.0):
        if targets.ndim != 2 or len(targets) != len(table):
            raise ValueError(f"targets must be ({len(table)}, classes), got {targets.shape}")
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
        return {"input": image, "target": self.targets[r % self.n], "pseudo": self.pseudo, "temperature": self.temperature}


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
            return {"input": torch.zeros(3, *self.target_hw, dtype=torch.uint8), "label": -1}
        image, label = self.images[i]
        return {"input": image, "label": label}


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
                 pseudo: PseudoSet | None = None, pin_memory: bool = False, n_classes: int | None = None):
        super().__init__()
        self.n_classes = int(n_classes if n_classes is not None else int(max(train.labels.max(), valid.labels.max())) + 1)
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
        parts: list[Dataset] = [TargetRows(self.train_table, one_hot(self.train_table.labels, self.n_classes), self.target_hw,
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



# ---------------------------------------------------------------------------- cached features


class FeatureBatches(Dataset):
    """Cached feature rows, fetched a whole batch at a time: ``dataset[list_of_rows]`` is a batch dict
    like the image datasets' (``input`` float32 features, ``label``, one-hot ``target``,
    ``temperature`` 1), so one ClassifierModule trains both. Used with ``batch_size=None`` and a
    batch sampler."""

    def __init__(self, features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, n_classes: int):
        self.features = torch.as_tensor(features)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.n_classes = int(n_classes)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, rows: list[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        labels = self.labels[rows]
        return {"input": self.features[rows].float(), "label": labels,
                "target": F.one_hot(labels.clamp(min=0), self.n_classes).float(),
                "temperature": torch.ones(len(rows))}


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
    table = index.pivot(index="id", columns="copy", values="row")
    first = index.loc[index["copy"] == 0, "id"]
    return table.loc[first].to_numpy(dtype=np.int64)


class CachedFeaturesDataModule(L.LightningDataModule):
    """Train: random copy per image per epoch; valid: the unaugmented valid rows."""

    def __init__(self, train: FeatureSplit, valid: FeatureSplit, batch_size: int, classes: Sequence[str], seed: int = 0):
        super().__init__()
        self.classes = list(classes)
        self.train_split, self.valid_split = train, valid
        self.batch_size, self.seed = batch_size, seed

    def train_dataloader(self) -> DataLoader:
        dataset = FeatureBatches(self.train_split.features, self.train_split.labels(self.classes), len(self.classes))
        sampler = RandomCopyBatches(copy_row_table(self.train_split), self.batch_size, self.seed)
        return DataLoader(dataset, batch_size=None, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        dataset = FeatureBatches(self.valid_split.features, self.valid_split.labels(self.classes), len(self.classes))
        return DataLoader(dataset, batch_size=None, sampler=SequentialBatches(self.valid_split.rows_of_copy(0), self.batch_size))

