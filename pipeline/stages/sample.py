"""``sample`` stage: a small mirror of the split for fast iteration (checking learning rates,
trying augmentations) before paying for a full run.

The fast.ai course's convention is ~1,500 train and 1,000 valid images; both are capped by what the split
holds. Train images come only from train drivers and valid images only from valid drivers (in cv
mode: fold 0's drivers), so the sample keeps drivers apart exactly as the full split does. Images are hard-linked (copied across
filesystems) into ``data/sample/{train,valid}/<class>/``, the Keras-style folder layout the fast.ai course used,
next to ``data/sample/split.csv`` (the split's rows plus each image's path in the mirror).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.competition import TRAIN_INDEX
from pipeline.config import Config
from pipeline.errors import StageError
from pipeline.io import atomic_dir
from pipeline.metrics import write_stage_metrics


def draw(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Exactly ``min(n, len(rows))`` rows, stratified by class: rows are shuffled, ranked within their
    class, and the ``n`` with the lowest rank/class-size are kept, so each class gets its share."""
    if n >= len(rows):
        return rows
    shuffled = rows.sample(frac=1, random_state=seed)
    by_class = shuffled.groupby("label")
    share = (by_class.cumcount() + 0.5) / by_class["id"].transform("size")
    return shuffled.loc[share.sort_values(kind="stable").index[:n]]


def with_valid_split(split: pd.DataFrame) -> pd.DataFrame:
    """cv mode holds nothing out for good: the sample's valid part is then drawn from fold 0's groups."""
    if (split["split"] == "valid").any():
        return split
    return split.assign(split=np.where(pd.to_numeric(split["fold"]) == 0, "valid", "train"))


def make_sample(split: pd.DataFrame, n_train: int, n_valid: int, seed: int) -> pd.DataFrame:
    split = with_valid_split(split)
    parts = [draw(split[split["split"] == "train"], n_train, seed), draw(split[split["split"] == "valid"], n_valid, seed)]
    return pd.concat(parts).sort_values(["split", "id"]).reset_index(drop=True)


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def mirror_images(sample: pd.DataFrame, paths: dict[str, str], raw: Path, out: Path) -> list[str]:
    """Link each image to ``<split>/<label>/<file name>``; returns those paths (relative to ``out``)."""
    mirrored = []
    for row in sample.itertuples():
        rel = f"{row.split}/{row.label}/{Path(paths[row.id]).name}"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(raw / paths[row.id], out / rel)
        mirrored.append(rel)
    return mirrored


def read_inputs(cfg: Config) -> tuple[pd.DataFrame, dict[str, str]]:
    split_csv, index_csv = cfg.paths.path("split_csv"), cfg.paths.path("raw") / TRAIN_INDEX
    for path in (split_csv, index_csv):
        if not path.exists():
            raise StageError(f"{path} not found: run the ingest and split stages first")
    index = pd.read_csv(index_csv, dtype=str, keep_default_na=False)
    split = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
    split["fold"] = split["fold"].astype(int)
    return split, dict(zip(index["id"], index["path"], strict=True))


def run(cfg: Config) -> dict:
    start = time.perf_counter()
    split, paths = read_inputs(cfg)
    sample = make_sample(split, cfg.sample.n_train, cfg.sample.n_valid, cfg.sample.seed)
    with atomic_dir(cfg.paths.path("sample")) as tmp:
        sample["path"] = mirror_images(sample, paths, cfg.paths.path("raw"), tmp)
        sample.to_csv(tmp / "split.csv", index=False)
    counts = sample["split"].value_counts()
    figures = {
        "n_train": int(counts.get("train", 0)),
        "n_valid": int(counts.get("valid", 0)),
        "train_groups": int(sample.loc[sample["split"] == "train", "group"].nunique()),
        "valid_groups": int(sample.loc[sample["split"] == "valid", "group"].nunique()),
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_stage_metrics(cfg.paths.stage_metrics_file("sample"), figures)
    return figures
