"""Batches of cached features: one random copy per image per epoch, fetched by row lists as the
same batch dicts the image data modules give (so one LightningModule trains both)."""

import numpy as np
import torch

from pipeline.training.datamodules import FeatureBatches, RandomCopyBatches


def test_one_random_copy_per_image_per_epoch():
    n_images, copies = 50, 4
    row_table = np.arange(n_images * copies).reshape(copies, n_images).T  # copy-major rows
    sampler = RandomCopyBatches(row_table, batch_size=8, seed=1)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        rows = np.concatenate(list(sampler))
        assert len(rows) == n_images and len(list(sampler)) == len(sampler) == 7
        assert sorted(rows % n_images) == list(range(n_images))  # every image exactly once
        epochs.append(rows)
    assert not np.array_equal(epochs[0] // n_images, epochs[1] // n_images)  # copies change per epoch
    assert len(set((epochs[0] // n_images).tolist())) == copies
    sampler.set_epoch(1)
    assert np.array_equal(np.concatenate(list(sampler)), epochs[1])  # seeded by (seed, epoch)


def test_feature_batches_are_fetched_by_row_lists():
    feats = torch.arange(20, dtype=torch.float16).view(10, 2)
    dataset = FeatureBatches(feats, torch.arange(10) % 3, n_classes=3)
    batch = dataset[[3, 1]]
    assert batch["input"].dtype == torch.float32 and batch["input"].tolist() == [[6, 7], [2, 3]]
    assert batch["label"].tolist() == [0, 1] and batch["target"].tolist() == [[1, 0, 0], [0, 1, 0]]

