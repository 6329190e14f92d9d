"""``features`` stage: the frozen conv base run once over valid, test, and train x N augmented copies,
cached as fp16 so the dense head trains in seconds per epoch (the course's fast inner loop).

Layout (the DVC out is the whole ``data/features`` folder)::

    data/features/
      meta.json                    written last: the cache is complete only when it exists and
                                   its fingerprints match the split folders
      {valid,test,train}/
        fingerprint.txt            hash of everything the chunks depend on
        index.csv                  img,row,copy,chunk,offset,classname (one line per cached row)
        chunk_00000.npy ...        float16 (rows, channels * grid * grid), chunk_size rows each

What is cached. VGG's pool5 map (512x7x7 at 224 px for vgg16_bn: 50 KB per image in fp16, 11 GB
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from pipeline.config import Config
from pipeline.data import ImageRowsDataset, build_augmentation, class_index, seed_worker
from pipeline.errors import StageError
from pipeline.io import (
    atomic_path,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    read_json,
)
from pipeline.metrics import write_stage_metrics
from pipeline.models import create_backbone, create_conv_base, input_hw, resolve_preprocessing

SPLITS = ("valid", "test", "train")
FORMAT_VERSION = 1
FP16_MAX = float(np.finfo(np.float16).max)
META_FILE = "meta.json"
FINGERPRINT_FILE = "fingerprint.txt"
INDEX_FILE = "index.csv"

# Called after each chunk is written: (split, chunk number). Tests use it to simulate a kill.
ChunkHook = Callable[[str, int], None]


# ---------------------------------------------------------------------------- what to cache


@dataclass
class SplitRows:
    """The rows of one split's cache, in row order."""

    name: str
    table: pd.DataFrame  # img, path, classname, copy (row = position)
    n_images: int
    copies: int


def read_image_tables(cfg: Config) -> dict[str, pd.DataFrame]:
    """img, path, classname per split. Train/valid come from the split (or the sample's split when
    ``features.use_sample``), test from data/raw/test_index.csv; paths are absolute."""
    raw = cfg.paths.path("raw")
    test_index = raw / "test_index.csv"
    if cfg.features.use_sample:
        split_csv = cfg.paths.path("sample") / "split.csv"
        if not split_csv.exists():
            raise StageError(f"{split_csv} not found: run the sample stage first (features.use_sample=true)")
        split = pd.read_csv(split_csv, dtype={"img": str, "classname": str, "split": str})
        sample_dir = cfg.paths.path("sample")
        split["path"] = [str(sample_dir / s / c / i) for s, c, i in zip(split["split"], split["classname"], split["img"], strict=True)]
    else:
        split_csv, train_index = cfg.paths.path("split_csv"), raw / "train_index.csv"
        for path in (split_csv, train_index):
            if not path.exists():
                raise StageError(f"{path} not found: run the ingest and split stages first")
        split = pd.read_csv(split_csv, dtype={"img": str, "classname": str, "split": str})
        paths = pd.read_csv(train_index, dtype=str).set_index("img")["path"]
        missing = ~split["img"].isin(paths.index)
        if missing.any():
            raise StageError(f"{split_csv}: image {split['img'][missing].iloc[0]!r} is not in {train_index}")
        split["path"] = [str(raw / p) for p in paths.loc[split["img"]]]
    if not test_index.exists():
        raise StageError(f"{test_index} not found: run the ingest stage first")
    test = pd.read_csv(test_index, dtype=str)
    test["path"] = [str(raw / p) for p in test["path"]]
    test["classname"] = ""
    cols = ["img", "path", "classname"]
    return {
        "valid": split.loc[split["split"] == "valid", cols].reset_index(drop=True),
        "test": test[cols].reset_index(drop=True),
        "train": split.loc[split["split"] == "train", cols].reset_index(drop=True),
    }


def plan_rows(name: str, images: pd.DataFrame, copies: int) -> SplitRows:
    """Copy-major rows: copy 0 of every image, then copy 1, ..."""
    n_copies = copies if name == "train" else 1
    parts = [images.assign(copy=k) for k in range(n_copies)]
    table = pd.concat(parts, ignore_index=True) if parts else images.assign(copy=0)
    return SplitRows(name, table, len(images), n_copies)


def chunk_count(n_rows: int, chunk_size: int) -> int:
    return (n_rows + chunk_size - 1) // chunk_size


def chunk_bounds(j: int, n_rows: int, chunk_size: int) -> tuple[int, int]:
    return j * chunk_size, min((j + 1) * chunk_size, n_rows)


def index_table(rows: SplitRows, chunk_size: int) -> pd.DataFrame:
    row = np.arange(len(rows.table))
    return pd.DataFrame({
        "img": rows.table["img"].to_numpy(),
        "row": row,
        "copy": rows.table["copy"].to_numpy(),
        "chunk": row // chunk_size,
        "offset": row % chunk_size,
        "classname": rows.table["classname"].to_numpy(),
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
    names = hashlib.sha256("\n".join(rows.table["img"]).encode()).hexdigest()
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


def chunk_path(split_dir: Path, j: int) -> Path:
    return split_dir / f"chunk_{j:05d}.npy"


def chunk_is_valid(path: Path, n_rows: int, dim: int) -> bool:
    """A finished chunk: present, fp16, right shape (reads the header only)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.dtype == np.float16 and arr.shape == (n_rows, dim)


def write_chunk(path: Path, features: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, features)


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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def embed_batches(conv_base: torch.nn.Module, loader: DataLoader, device: torch.device) -> Iterator[np.ndarray]:
    """fp16 features per batch (autocast fp16 on CUDA, fp32 on CPU), clipped to the fp16 range."""
    use_cuda = device.type == "cuda"
    for images, _labels in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_cuda):
            out = conv_base(images)
        yield out.float().clamp_(-FP16_MAX, FP16_MAX).to(torch.float16).cpu().numpy()


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
    dataset = ImageRowsDataset(rows.table["path"].tolist(), target_hw, labels=class_index(rows.table["classname"].tolist()),
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


@dataclass
class FeatureSplit:
    """One split of a complete cache: ``features[row]`` is the row described by ``index.iloc[row]``."""

    name: str
    index: pd.DataFrame
    features: np.ndarray  # (n_rows, dim) float16
    copies: int

    def rows_of_copy(self, copy: int) -> np.ndarray:
        return self.index.index[self.index["copy"] == copy].to_numpy()


def load_meta(features_dir: Path) -> dict[str, Any]:
    """The cache's meta.json; a StageError when the cache is missing or incomplete."""
    path = Path(features_dir) / META_FILE
    if not path.exists():
        raise StageError(f"{features_dir} holds no complete feature cache (no {META_FILE}): run the features stage")
    meta = read_json(path)
    if not meta.get("complete"):
        raise StageError(f"{path}: feature cache is not complete: run the features stage")
    return meta


def load_split(features_dir: Path | str, split: str) -> FeatureSplit:
    """Load one split of a complete cache into memory (fp16), checking it against meta.json."""
    features_dir = Path(features_dir)
    meta = load_meta(features_dir)
    info = meta["splits"].get(split)
    if info is None:
        raise StageError(f"{features_dir / META_FILE}: no split {split!r}")
    split_dir = features_dir / split
    marker = split_dir / FINGERPRINT_FILE
    if not marker.exists() or marker.read_text().strip() != info["fingerprint"]:
        raise StageError(f"{split_dir}: chunks do not match {META_FILE} (fingerprint): rerun the features stage")
    index = pd.read_csv(split_dir / INDEX_FILE, dtype={"img": str, "classname": str}, keep_default_na=False)
    n_rows, dim, chunk_size = info["n_rows"], meta["feature_dim"], meta["chunk_size"]
    if len(index) != n_rows:
        raise StageError(f"{split_dir / INDEX_FILE}: {len(index)} rows, {META_FILE} says {n_rows}")
    features = np.empty((n_rows, dim), dtype=np.float16)
    for j in range(chunk_count(n_rows, chunk_size)):
        lo, hi = chunk_bounds(j, n_rows, chunk_size)
        path = chunk_path(split_dir, j)
        if not chunk_is_valid(path, hi - lo, dim):
            raise StageError(f"{path}: missing or malformed chunk: rerun the features stage")
        features[lo:hi] = np.load(path)
    return FeatureSplit(split, index, features, int(info["copies"]))


# ---------------------------------------------------------------------------- stage


def build_meta(cfg: Config, data_cfg: dict[str, Any], channels: int, dim: int, split_info: dict[str, Any]) -> dict[str, Any]:
    return {
        "complete": True,
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
    tables = read_image_tables(cfg)
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
                            "n_chunks": chunk_count(len(rows.table), cfg.features.chunk_size), "fingerprint": fingerprint}
    meta = build_meta(cfg, data_cfg, channels, dim, split_info)
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


def main() -> None:
    """Run the stage with params.yaml (the same as ``python -m pipeline features``)."""
    from pipeline.cli import main as cli_main

    raise SystemExit(cli_main(["features"]))
