"""How much class information a backbone's frozen conv features carry across groups (drivers): a
nearest-class-centroid probe, each group predicted from the others. It needs no training, so it
measures the features themselves; the pretrain stand-in is judged by its gain over a random init."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.competition import TRAIN_INDEX, label_indices, read_competition
from pipeline.config import ModelConfig
from pipeline.data import ImageRowsDataset
from pipeline.models import create_backbone, create_conv_base, input_hw, resolve_preprocessing


def leave_one_group_out_accuracy(features: np.ndarray, labels: np.ndarray, groups: np.ndarray) -> float:
    """Nearest class centroid on standardised features, each group's rows predicted from the others'."""
    correct = 0
    for group in np.unique(groups):
        train, test = groups != group, groups == group
        mean, std = features[train].mean(0), features[train].std(0) + 1e-6
        z = (features - mean) / std
        classes = np.unique(labels[train])
        centroids = np.stack([z[train & (labels == k)].mean(0) for k in classes])
        distances = ((z[test][:, None, :] - centroids[None]) ** 2).sum(-1)
        correct += int((classes[distances.argmin(1)] == labels[test]).sum())
    return correct / len(labels)


def conv_features(model_cfg: ModelConfig, grid: int, paths: Sequence[Path], batch_size: int = 64) -> np.ndarray:
    """The pooled conv features (as the features stage computes them, unaugmented) of ``paths``."""
    backbone = create_backbone(model_cfg)
    data_cfg = resolve_preprocessing(backbone, model_cfg)
    conv_base = create_conv_base(backbone, data_cfg, grid)
    images = ImageRowsDataset(list(paths), input_hw(data_cfg))
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([images[i][0] for i in range(start, min(start + batch_size, len(images)))])
            out.append(conv_base(batch).float().numpy())
    return np.concatenate(out)


def transfer_probe(model_cfg: ModelConfig, grid: int, paths: Sequence[Path], labels: np.ndarray,
                   groups: np.ndarray) -> float:
    """Leave-one-group-out accuracy of ``model_cfg``'s backbone (its ``weights`` as configured)."""
    return leave_one_group_out_accuracy(conv_features(model_cfg, grid, paths), labels, groups)


def labelled_train_rows(raw_dir: Path) -> tuple[list[Path], np.ndarray, np.ndarray]:
    """The competition's labelled train images from ingest's index: (paths, class indices, groups)."""
    table = pd.read_csv(raw_dir / TRAIN_INDEX, dtype=str, keep_default_na=False)
    labels = label_indices(table["label"].tolist(), read_competition(raw_dir).classes)
    return [raw_dir / p for p in table["path"]], labels, table["group"].to_numpy()
