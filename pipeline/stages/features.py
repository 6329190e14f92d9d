"""``features`` stage: the frozen conv base run once over valid, test, and train x N augmented copies,
cached as fp16 so the dense head trains in seconds per epoch (the course's fast inner loop).

The cache's format (folders, ``index.csv``, checksummed fp16 chunks, ``meta.json`` written last) is
``pipeline.featurecache``'s; this stage is its only writer.

What is cached. The backbone's last feature map (vgg16_bn: pool5, 512x7x7 at 224 px: 50 KB per image in fp16, 11 GB
for 10 copies of 22k train images) is average-pooled to ``features.grid`` x ``grid`` and flattened
(channel-major, like ``torch.flatten``). Grid 2 keeps coarse position (left/right hand, top/bottom)
at 512*4*2 = 4 KB per image (0.9 GB for 224k train rows); grid 3 is 9 KB. ``meta.json`` records
``bytes_per_image``.

Rows. Train rows are copy-major: all images as copy 0 (unaugmented), then all as copy 1, ... so
copy ``k`` of image ``i`` is row ``k * n_images + i``. Valid and test have copy 0 only (never
augmented). ``index.csv`` maps each row to its image, copy, chunk and offset in the chunk.

Streaming and resume. Rows flow through one DataLoader into a single chunk buffer; each full chunk
is written atomically (temp file, then rename) and the buffer is reused, so memory does not grow
with the dataset. A rerun skips every chunk already on disk whose folder fingerprint matches; a
folder with another fingerprint (other model, input size, grid, chunk size, augmentation, seed or
image list) is wiped first, so stale chunks are never reused. ``meta.json`` is removed when a run
starts and written only after every split is complete; readers (``load_split``) refuse a cache
without it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from pipeline.competition import read_competition
from pipeline.config import Config
from pipeline.data import ImageRowsDataset, build_augmentation, seed_worker
from pipeline.featurecache import (
    FINGERPRINT_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    META_FILE,
    chunk_bounds,
    chunk_checksums,
    chunk_count,
    chunk_is_valid,
    chunk_path,
    embed_batches,
    resolve_device,
    write_chunk,
)
from pipeline.io import (
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
)
from pipeline.metrics import write_stage_metrics
from pipeline.models import create_backbone, create_conv_base, input_hw, resolve_preprocessing
from pipeline.tables import read_image_tables

SPLITS = ("valid", "test", "train")
# Called after each chunk is written: (split, chunk number). Tests use it to simulate a kill.
ChunkHook = Callable[[str, int], None]


# ---------------------------------------------------------------------------- what to cache


@dataclass
class SplitRows:
    """The rows of one split's cache, in row order."""

    name: str
    table: pd.DataFrame  # id, path, label, copy (row = position)
    n_images: int
    copies: int


def plan_rows(name: str, images: pd.DataFrame, copies: int) -> SplitRows:
    """Copy-major rows: copy 0 of every image, then copy 1, ..."""
    n_copies = copies if name == "train" else 1
    parts = [images.assign(copy=k) for k in range(n_copies)]
    table = pd.concat(parts, ignore_index=True) if parts else images.assign(copy=0)
    return SplitRows(name, table, len(images), n_copies)


def index_table(rows: SplitRows, chunk_size: int) -> pd.DataFrame:
    row = np.arange(len(rows.table))
    return pd.DataFrame({
        "id": rows.table["id"].to_numpy(),
        "row": row,
        "copy": rows.table["copy"].to_numpy(),
        "chunk": row // chunk_size,
        "offset": row % chunk_size,
        "label": rows.table["label"].to_numpy(),
    })


# ---------------------------------------------------------------------------- fingerprints


def weights_identity(cfg: Config) -> dict[str, Any]:
    """The model config plus a content hash of a local weights file (a re-run pretrain or a new
    download must invalidate the cached chunks; a touched-but-equal file must not)."""
    model = cfg.model.model_dump(mode="json")
    weights = {"file": cfg.model.weights_file, "pretrain": cfg.model.pretrain_file}.get(cfg.model.weights)
    if weights and Path(weights).expanduser().exists():
        model["weights_sha256"] = file_sha256(Path(weights).expanduser())
    return model


def split_fingerprint(cfg: Config, rows: SplitRows) -> str:
    """Hash of everything a split's chunks depend on (not batch size, workers or device)."""
    names = hashlib.sha256("\n".join(rows.table["id"]).encode()).hexdigest()
    paths = hashlib.sha256("\n".join(Path(p).name for p in rows.table["path"]).encode()).hexdigest()
    spec: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "split": rows.name,
        "model": weights_identity(cfg),
        "grid": cfg.features.grid,
        "chunk_size": cfg.features.chunk_size,
        "copies": rows.copies,
        "images": names,
        "files": paths,
    }
    if rows.copies > 1:
        spec["augment"] = cfg.augment.model_dump(mode="json")
        spec["seed"] = cfg.features.seed
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- chunk files


def prepare_split_dir(split_dir: Path, fingerprint: str) -> None:
    """Keep the folder when its fingerprint matches (resume), else start it afresh; drop any temp
    files a killed run left behind."""
    marker = split_dir / FINGERPRINT_FILE
    if split_dir.exists() and (not marker.exists() or marker.read_text().strip() != fingerprint):
        shutil.rmtree(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    for leftover in split_dir.glob(".*.tmp*"):
        leftover.unlink(missing_ok=True)
    if not marker.exists():
        atomic_write_text(marker, fingerprint + "\n")


def finished_chunks(split_dir: Path, n_rows: int, chunk_size: int, dim: int) -> set[int]:
    done = set()
    for j in range(chunk_count(n_rows, chunk_size)):
        lo, hi = chunk_bounds(j, n_rows, chunk_size)
        if chunk_is_valid(chunk_path(split_dir, j), hi - lo, dim):
            done.add(j)
    return done


# ---------------------------------------------------------------------------- extraction


def todo_row_indices(todo: list[int], n_rows: int, chunk_size: int) -> np.ndarray:
    parts = [np.arange(*chunk_bounds(j, n_rows, chunk_size)) for j in todo]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def extract_split(cfg: Config, rows: SplitRows, split_dir: Path, conv_base: torch.nn.Module, dim: int,
                  target_hw: tuple[int, int], device: torch.device, on_chunk_written: ChunkHook | None) -> dict[str, Any]:
    """Compute and write the chunks of one split that are not on disk yet."""
    n_rows, chunk_size = len(rows.table), cfg.features.chunk_size
    done = finished_chunks(split_dir, n_rows, chunk_size, dim)
    todo = [j for j in range(chunk_count(n_rows, chunk_size)) if j not in done]
    stats = {"chunks_reused": len(done), "chunks_computed": 0, "rows_computed": 0, "seconds": 0.0}
    if not todo:
        return stats
    augmentation = build_augmentation(cfg.augment) if rows.copies > 1 else None
    dataset = ImageRowsDataset(rows.table["path"].tolist(), target_hw, labels=None,
                               copies=rows.table["copy"].tolist(), augmentation=augmentation, seed=cfg.features.seed)
    indices = todo_row_indices(todo, n_rows, chunk_size)
    workers = cfg.features.num_workers
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=cfg.features.batch_size, shuffle=False,
                        num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=seed_worker,
                        persistent_workers=False, prefetch_factor=4 if workers else None)
    buffer = np.empty((chunk_size, dim), dtype=np.float16)
    pending = iter(todo)
    current = next(pending)
    lo, hi = chunk_bounds(current, n_rows, chunk_size)
    filled = 0
    start = time.perf_counter()
    interactive = sys.stderr.isatty()
    with tqdm(total=len(indices), desc=f"features {rows.name}", unit="img", file=sys.stderr,
              mininterval=0.5 if interactive else 30.0, disable=None if interactive else False) as bar:
        for batch in embed_batches(conv_base, loader, device):
            pos = 0
            while pos < len(batch):
                take = min(len(batch) - pos, (hi - lo) - filled)
                buffer[filled:filled + take] = batch[pos:pos + take]
                filled += take
                pos += take
                if filled == hi - lo:
                    write_chunk(chunk_path(split_dir, current), buffer[:filled])
                    stats["chunks_computed"] += 1
                    stats["rows_computed"] += filled
                    if on_chunk_written is not None:
                        on_chunk_written(rows.name, current)
                    current = next(pending, -1)
                    if current >= 0:
                        lo, hi = chunk_bounds(current, n_rows, chunk_size)
                    filled = 0
            bar.update(len(batch))
    stats["seconds"] = time.perf_counter() - start
    return stats


# ---------------------------------------------------------------------------- reading the cache


# ---------------------------------------------------------------------------- stage


def build_meta(cfg: Config, data_cfg: dict[str, Any], channels: int, dim: int, split_info: dict[str, Any],
               classes: Sequence[str]) -> dict[str, Any]:
    return {
        "complete": True,
        "classes": list(classes),  # the competition's, in order: what the index's labels index into
        "format": FORMAT_VERSION,
        "arch": cfg.model.arch,
        "width_divisor": cfg.model.width_divisor if cfg.model.arch == "vgg16_bn_narrow" else 1,
        "weights": cfg.model.weights,
        "input_size": list(input_hw(data_cfg)),
        "mean": list(data_cfg["mean"]),
        "std": list(data_cfg["std"]),
        "channels": channels,
        "grid": cfg.features.grid,
        "feature_dim": dim,
        "layout": "adaptive_avg_pool(pool5, grid) flattened channel-major",
        "dtype": "float16",
        "bytes_per_image": dim * 2,
        "chunk_size": cfg.features.chunk_size,
        "copies": cfg.features.copies,
        "seed": cfg.features.seed,
        "splits": split_info,
    }


def run(cfg: Config, on_chunk_written: ChunkHook | None = None) -> dict[str, Any]:
    """Cache conv features for valid, test and train x copies; return the stage figures."""
    start = time.perf_counter()
    out_dir = cfg.paths.path("features")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / META_FILE).unlink(missing_ok=True)  # incomplete from here until the end
    tables = read_image_tables(cfg, cfg.features.use_sample)
    device = resolve_device(cfg.features.device)
    backbone = create_backbone(cfg.model)
    data_cfg = resolve_preprocessing(backbone, cfg.model)
    conv_base = create_conv_base(backbone, data_cfg, cfg.features.grid).to(device)
    channels, dim, target_hw = conv_base.channels, conv_base.out_features, input_hw(data_cfg)

    split_info: dict[str, Any] = {}
    totals = {"chunks_reused": 0, "chunks_computed": 0, "rows_computed": 0, "seconds": 0.0}
    for name in SPLITS:
        rows = plan_rows(name, tables[name], cfg.features.copies)
        fingerprint = split_fingerprint(cfg, rows)
        split_dir = out_dir / name
        prepare_split_dir(split_dir, fingerprint)
        atomic_write_csv(split_dir / INDEX_FILE, index_table(rows, cfg.features.chunk_size))
        stats = extract_split(cfg, rows, split_dir, conv_base, dim, target_hw, device, on_chunk_written)
        for key in totals:
            totals[key] += stats[key]
        split_info[name] = {"n_images": rows.n_images, "n_rows": len(rows.table), "copies": rows.copies,
                            "n_chunks": chunk_count(len(rows.table), cfg.features.chunk_size), "fingerprint": fingerprint,
                            "chunk_sha256": chunk_checksums(split_dir, len(rows.table), cfg.features.chunk_size)}
    meta = build_meta(cfg, data_cfg, channels, dim, split_info, read_competition(cfg.paths.path("raw")).classes)
    atomic_write_json(out_dir / META_FILE, meta)

    figures: dict[str, Any] = {
        **{f"n_{name}_images": info["n_images"] for name, info in split_info.items()},
        **{f"n_{name}_rows": info["n_rows"] for name, info in split_info.items()},
        "copies": cfg.features.copies,
        "grid": cfg.features.grid,
        "feature_dim": dim,
        "bytes_per_image": dim * 2,
        "cache_mb": round(sum(i["n_rows"] for i in split_info.values()) * dim * 2 / 2**20, 2),
        "chunks_computed": totals["chunks_computed"],
        "chunks_reused": totals["chunks_reused"],
        "images_per_s": round(totals["rows_computed"] / totals["seconds"], 1) if totals["seconds"] > 0 else None,
        "device": device.type,
        "seconds": round(time.perf_counter() - start, 3),
    }
    write_stage_metrics(cfg.paths.stage_metrics_file("features"), figures)
    return figures
