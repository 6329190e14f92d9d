"""The conv-feature cache format, shared by its writer (``pipeline.convfeatures.extract``, run by the
``features`` stage) and its readers (``head``, ``ensemble``, members).

Layout (the DVC out is the whole ``data/features`` folder)::

    data/features/
      meta.json                    written last: the cache is complete only when it exists and
                                   its fingerprints match the split folders
      {valid,test,train}/
        fingerprint.txt            hash of everything the chunks depend on
        index.csv                  id,row,copy,chunk,offset,label (one line per cached row)
        chunks.sha256              the writer's record of each chunk's sha256 (``sha256sum`` format),
                                   updated as each chunk is written: what a rerun may reuse
        chunk_00000.npy ...        float16 (rows, feature_dim), chunk_size rows each

``meta.json`` lists every chunk's sha256; readers verify it and that every value is finite, so a
corrupt chunk (flipped bytes behind an intact header, a NaN) is refused naming the file instead of
turning into NaN predictions downstream.

Train rows are copy-major: copy ``k`` of image ``i`` is row ``k * n_images + i``; valid and test
have copy 0 only.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.competition import label_indices
from pipeline.errors import StageError
from pipeline.io import atomic_write_bytes, atomic_write_text, read_json

FORMAT_VERSION = 3  # 2: id/label index columns, chunk checksums; 3: the writer's per-split checksum record
META_FILE = "meta.json"
FINGERPRINT_FILE = "fingerprint.txt"
INDEX_FILE = "index.csv"
CHECKSUMS_FILE = "chunks.sha256"
CHECKSUM_LINE = re.compile(r"([0-9a-f]{64})  chunk_(\d+)\.npy")


def chunk_count(n_rows: int, chunk_size: int) -> int:
    return (n_rows + chunk_size - 1) // chunk_size


def chunk_bounds(j: int, n_rows: int, chunk_size: int) -> tuple[int, int]:
    return j * chunk_size, min((j + 1) * chunk_size, n_rows)


def chunk_path(split_dir: Path, j: int) -> Path:
    return split_dir / f"chunk_{j:05d}.npy"


def chunk_is_valid(path: Path, n_rows: int, dim: int) -> bool:
    """A finished chunk: present, fp16, right shape (reads the header only)."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return arr.dtype == np.float16 and arr.shape == (n_rows, dim)


def chunk_file_bytes(features: np.ndarray) -> bytes:
    """The exact bytes of a chunk file (``.npy``) holding ``features``."""
    buffer = io.BytesIO()
    np.save(buffer, features)
    return buffer.getvalue()


def write_chunk(split_dir: Path, j: int, features: np.ndarray, checksums: dict[int, str]) -> None:
    """Write chunk ``j`` atomically, its sha256 added to ``checksums`` and saved in the split's record
    first: a kill in between leaves a recorded chunk that is missing or differs (recomputed by the next
    run), never a chunk on disk that the record does not vouch for."""
    data = chunk_file_bytes(features)
    checksums[j] = hashlib.sha256(data).hexdigest()
    write_chunk_checksums(split_dir, checksums)
    atomic_write_bytes(chunk_path(split_dir, j), data)


def read_chunk_checksums(split_dir: Path) -> dict[int, str]:
    """The writer's record: chunk number -> sha256 of the bytes it wrote ({} when there is none; a line
    that does not parse vouches for nothing)."""
    path = split_dir / CHECKSUMS_FILE
    if not path.exists():
        return {}
    found = (CHECKSUM_LINE.fullmatch(line) for line in path.read_text().splitlines())
    return {int(match[2]): match[1] for match in found if match}


def write_chunk_checksums(split_dir: Path, checksums: dict[int, str]) -> None:
    lines = (f"{sha}  {chunk_path(split_dir, j).name}\n" for j, sha in sorted(checksums.items()))
    atomic_write_text(split_dir / CHECKSUMS_FILE, "".join(lines))


@dataclass
class FeatureSplit:
    """One split of a complete cache: ``features[row]`` is the row described by ``index.iloc[row]``."""

    name: str
    index: pd.DataFrame
    features: np.ndarray  # (n_rows, dim) float16
    copies: int

    def labels(self, classes: Sequence[str]) -> np.ndarray:
        """Class index per row (-1 for test rows), in the competition's class order."""
        return label_indices(self.index["label"].tolist(), classes, "features index", allow_missing=True)

    def rows_of_copy(self, copy: int) -> np.ndarray:
        return self.index.index[self.index["copy"] == copy].to_numpy()

    def subset(self, ids: Iterable[str], plain_only: bool = False) -> FeatureSplit:
        """The rows (every copy, or copy 0 only) of ``ids``, renumbered so row ``i`` is ``features[i]``."""
        keep = self.index["id"].isin(set(ids)).to_numpy().copy()
        if plain_only:
            keep &= (self.index["copy"] == 0).to_numpy()
        return FeatureSplit(self.name, renumbered(self.index.loc[keep]), self.features[keep], 1 if plain_only else self.copies)


def renumbered(index: pd.DataFrame) -> pd.DataFrame:
    index = index.reset_index(drop=True)
    index["row"] = np.arange(len(index))
    return index


def concat_splits(name: str, parts: Sequence[FeatureSplit]) -> FeatureSplit:
    """Several splits' rows as one (e.g. a fold's held-out rows from the train and valid caches)."""
    index = renumbered(pd.concat([p.index for p in parts], ignore_index=True))
    features = np.concatenate([p.features for p in parts]) if parts else np.empty((0, 0), np.float16)
    return FeatureSplit(name, index, features, min((p.copies for p in parts), default=1))


def load_meta(features_dir: Path) -> dict[str, Any]:
    """The cache's meta.json; a StageError when the cache is missing or incomplete."""
    path = Path(features_dir) / META_FILE
    if not path.exists():
        raise StageError(f"{features_dir} holds no complete feature cache (no {META_FILE}): run the features stage")
    meta = read_json(path)
    if not meta.get("complete"):
        raise StageError(f"{path}: feature cache is not complete: run the features stage")
    return meta


def load_split(features_dir: Path | str, split: str, copy: int | None = None) -> FeatureSplit:
    """Load one split of a complete cache into memory (fp16), checking it against meta.json; with
    ``copy``, only that copy's rows (renumbered), so memory holds one copy and one chunk, not all."""
    features_dir = Path(features_dir)
    meta = load_meta(features_dir)
    info = meta["splits"].get(split)
    if info is None:
        raise StageError(f"{features_dir / META_FILE}: no split {split!r}")
    split_dir = features_dir / split
    marker = split_dir / FINGERPRINT_FILE
    if not marker.exists() or marker.read_text().strip() != info["fingerprint"]:
        raise StageError(f"{split_dir}: chunks do not match {META_FILE} (fingerprint): rerun the features stage")
    index = pd.read_csv(split_dir / INDEX_FILE, dtype={"id": str, "label": str}, keep_default_na=False)
    n_rows, dim, chunk_size = info["n_rows"], meta["feature_dim"], meta["chunk_size"]
    if len(index) != n_rows:
        raise StageError(f"{split_dir / INDEX_FILE}: {len(index)} rows, {META_FILE} says {n_rows}")
    wanted = np.arange(n_rows) if copy is None else np.flatnonzero(index["copy"].to_numpy() == copy)
    features = np.empty((len(wanted), dim), dtype=np.float16)
    for j in range(chunk_count(n_rows, chunk_size)):
        lo, hi = chunk_bounds(j, n_rows, chunk_size)
        first, last = np.searchsorted(wanted, [lo, hi])
        if first == last:  # no wanted row in this chunk
            continue
        path = chunk_path(split_dir, j)
        if not chunk_is_valid(path, hi - lo, dim):
            raise StageError(f"{path}: missing or malformed chunk: rerun the features stage")
        data = path.read_bytes()  # read once: hashed and parsed from the same bytes
        expected = info.get("chunk_sha256", [None] * (j + 1))[j]
        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise StageError(f"{path}: checksum differs from {META_FILE} (a corrupt chunk, or one a features run "
                             "has not finished): rerun the features stage, which recomputes it")
        chunk = np.load(io.BytesIO(data))
        if not np.isfinite(chunk).all():
            row = int(np.argwhere(~np.isfinite(chunk))[0][0])
            raise StageError(f"{path}: non-finite feature value in row {row} of the chunk: delete {features_dir} "
                             "and rerun the features stage")
        features[first:last] = chunk[wanted[first:last] - lo]
    if copy is None:
        return FeatureSplit(split, index, features, int(info["copies"]))
    return FeatureSplit(split, renumbered(index.iloc[wanted]), features, 1)


def plain_features(features_dir: Path, ids: list[str], split_names: tuple[str, ...]) -> np.ndarray:
    """The cached unaugmented (copy 0) conv features of ``ids``, looked up in the named cache splits."""
    parts = []
    for name in split_names:
        split = load_split(features_dir, name, copy=0)
        parts.append(pd.DataFrame(split.features.astype(np.float32), index=split.index["id"].to_numpy()))
    table = pd.concat(parts)
    missing = [i for i in ids if i not in table.index]
    if missing:
        raise StageError(f"{features_dir}: no cached features for {missing[0]!r}: rerun the features stage")
    return table.loc[ids].to_numpy()
