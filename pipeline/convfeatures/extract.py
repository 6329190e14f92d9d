"""Computing the conv-feature cache (``pipeline.convfeatures.cache``'s format): the frozen conv base run
over valid, test, and train x N augmented copies, written as checksummed fp16 chunks. The
``features`` stage composes these; it is the cache's only writer.

Rows. Train rows are copy-major: all images as copy 0 (unaugmented), then all as copy 1, ... so
copy ``k`` of image ``i`` is row ``k * n_images + i``. Valid and test have copy 0 only (never
augmented). ``index.csv`` maps each row to its image, copy, chunk and offset in the chunk.

Streaming and resume. Rows flow through one DataLoader into a single chunk buffer; each full chunk
is written atomically (temp file, then rename) and the buffer is reused, so memory does not grow
with the dataset. Each split folder keeps a record of the sha256 of every chunk this module wrote
(``chunks.sha256``, saved before the chunk itself). A rerun reuses a chunk only when its bytes match
that record; any other chunk file (changed values behind an intact header, a torn or foreign file)
is recomputed and counted in ``chunks_corrupt``, so ``meta.json`` never vouches for bytes the writer
did not write. A folder with another fingerprint (other model, input size, grid, chunk size,
augmentation, seed or image list) is wiped first, so stale chunks are never reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from pipeline.config import Config
from pipeline.convfeatures.cache import (
    FINGERPRINT_FILE,
    FORMAT_VERSION,
    INDEX_FILE,
    chunk_bounds,
    chunk_count,
    chunk_path,
    read_chunk_checksums,
    write_chunk,
)
from pipeline.convfeatures.embed import embed_batches
from pipeline.data import ImageRowsDataset, build_augmentation, seed_worker
from pipeline.errors import StageError
from pipeline.io import atomic_write_csv, atomic_write_text, file_sha256
from pipeline.models import input_hw

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


def verified_chunks(split_dir: Path, n_chunks: int, checksums: dict[int, str]) -> tuple[set[int], list[int]]:
    """The chunks on disk whose bytes are those this stage recorded writing (reusable), and the chunk
    files whose bytes differ or were never recorded (corrupt: to recompute)."""
    reusable, corrupt = set(), []
    for j in range(n_chunks):
        path = chunk_path(split_dir, j)
        if not path.exists():
            continue
        if checksums.get(j) == file_sha256(path):
            reusable.add(j)
        else:
            corrupt.append(j)
    return reusable, corrupt


# ---------------------------------------------------------------------------- extraction


def todo_row_indices(todo: list[int], n_rows: int, chunk_size: int) -> np.ndarray:
    parts = [np.arange(*chunk_bounds(j, n_rows, chunk_size)) for j in todo]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def extract_split(cfg: Config, rows: SplitRows, split_dir: Path, conv_base: torch.nn.Module, dim: int,
                  target_hw: tuple[int, int], device: torch.device,
                  on_chunk_written: ChunkHook | None) -> tuple[dict[str, Any], list[str]]:
    """Compute and write the chunks of one split that are not on disk as this stage wrote them; return
    the figures and every chunk's sha256, in order."""
    n_rows, chunk_size = len(rows.table), cfg.features.chunk_size
    n_chunks = chunk_count(n_rows, chunk_size)
    checksums = read_chunk_checksums(split_dir)
    reusable, corrupt = verified_chunks(split_dir, n_chunks, checksums)
    if corrupt:
        names = ", ".join(chunk_path(split_dir, j).name for j in corrupt[:5]) + (", ..." if len(corrupt) > 5 else "")
        print(f"[features] {rows.name}: {len(corrupt)} chunk file(s) differ from the checksums recorded when this "
              f"stage wrote them ({names}): recomputing", file=sys.stderr, flush=True)
    todo = [j for j in range(n_chunks) if j not in reusable]
    stats = {"chunks_reused": len(reusable), "chunks_computed": 0, "chunks_corrupt": len(corrupt), "rows_computed": 0,
             "seconds": 0.0}
    written: set[int] = set()
    if todo:
        start = time.perf_counter()
        # closing: a failing hook ends the loader (and its workers) now, not when the generator is collected
        with contextlib.closing(compute_chunks(cfg, rows, split_dir, conv_base, dim, target_hw, device, todo,
                                               checksums)) as computed:
            for j, filled in computed:
                written.add(j)
                stats["chunks_computed"] += 1
                stats["rows_computed"] += filled
                if on_chunk_written is not None:
                    on_chunk_written(rows.name, j)
        stats["seconds"] = time.perf_counter() - start
    unwritten = sorted(set(todo) - written)
    if unwritten:
        raise StageError(f"{split_dir}: chunks {unwritten[:5]} were not computed (the data loader ended early)")
    return stats, [checksums[j] for j in range(n_chunks)]


def compute_chunks(cfg: Config, rows: SplitRows, split_dir: Path, conv_base: torch.nn.Module, dim: int,
                   target_hw: tuple[int, int], device: torch.device, todo: list[int],
                   checksums: dict[int, str]) -> Iterator[tuple[int, int]]:
    """Compute and write the ``todo`` chunks in order, recording each one's sha256 in ``checksums``;
    yield (chunk number, rows) after each is written."""
    n_rows, chunk_size = len(rows.table), cfg.features.chunk_size
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
                    write_chunk(split_dir, current, buffer[:filled], checksums)
                    yield current, filled
                    current = next(pending, -1)
                    if current >= 0:
                        lo, hi = chunk_bounds(current, n_rows, chunk_size)
                    filled = 0
            bar.update(len(batch))


# ---------------------------------------------------------------------------- one split, and the meta


def cache_split(cfg: Config, name: str, images: pd.DataFrame, split_dir: Path, conv_base: torch.nn.Module,
                target_hw: tuple[int, int], device: torch.device,
                on_chunk_written: ChunkHook | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Bring one split's folder up to date (fingerprint, index, every chunk verified or recomputed);
    return its entry of ``meta.json``'s splits and the run's figures for it."""
    rows = plan_rows(name, images, cfg.features.copies)
    fingerprint = split_fingerprint(cfg, rows)
    prepare_split_dir(split_dir, fingerprint)
    atomic_write_csv(split_dir / INDEX_FILE, index_table(rows, cfg.features.chunk_size))
    stats, chunk_sha256 = extract_split(cfg, rows, split_dir, conv_base, conv_base.out_features, target_hw, device,
                                        on_chunk_written)
    info = {"n_images": rows.n_images, "n_rows": len(rows.table), "copies": rows.copies,
            "n_chunks": len(chunk_sha256), "fingerprint": fingerprint, "chunk_sha256": chunk_sha256}
    return info, stats


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
