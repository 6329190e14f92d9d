"""Duplicate images, counted by ingest as information for the Kaggler, never as an error: a test image
that is a train image under another id (its label is known), and a train image that repeats one of
another group (a leak across a group split: one driver's frame filed under another driver). Without a
group column every image is its own group, so any repeat within train crosses folds.

Exact duplicates have the same bytes (a digest of the file); near duplicates an equal or almost equal
8x8 difference hash of the decoded pixels (re-encoded, resized or lightly edited copies), computed from
the decode that ingest's image check does anyway.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

HASH_SIZE = 8  # a 64-bit hash: 8 rows of 8 left-to-right brightness steps
# The hashed image keeps at least this many pixels a side (where the file has them): a thumbnail of
# a 2x2 reduced decode would make unrelated small images collide.
HASHED_SIDE = 4 * HASH_SIZE
# Near: at most this many of the 64 bits differ. Re-encoding, halving the size or brightening a 640x480
# photo flipped 0-3 bits; different photos differed in 20-30.
NEAR_BITS = 3
CHUNK = 256  # query hashes compared at once: a CHUNK x len(pool) distance matrix
NO_MATCH = 65  # more bits than a hash has: no pool hash (of another group) at all


@dataclass(frozen=True)
class Fingerprint:
    digest: str  # of the file's bytes
    dhash: int  # 64-bit difference hash of the pixels


def fingerprint(data: bytes, image: Image.Image) -> Fingerprint:
    """The file's ``data`` and its decoded ``image`` (any size: ingest decodes JPEGs at 1/8 scale)."""
    return Fingerprint(hashlib.blake2b(data, digest_size=16).hexdigest(), difference_hash(image))


def difference_hash(image: Image.Image) -> int:
    """Bit i: grey pixel i of a (HASH_SIZE + 1) x HASH_SIZE thumbnail is brighter than its right neighbour."""
    grey = np.asarray(image.convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, :-1] > grey[:, 1:]).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


@dataclass(frozen=True)
class Match:
    path: str
    other: str  # the train image it duplicates
    bits: int  # hash bits that differ (0 for an exact duplicate)


@dataclass(frozen=True)
class Duplicates:
    """Test images duplicating a train image; train images duplicating one of another group. A near
    duplicate is one that is not also an exact one."""

    test_exact: list[Match] = field(default_factory=list)
    test_near: list[Match] = field(default_factory=list)
    train_exact: list[Match] = field(default_factory=list)
    train_near: list[Match] = field(default_factory=list)

    def figures(self) -> dict[str, int]:
        return {"n_test_dup_exact": len(self.test_exact), "n_test_dup_near": len(self.test_near),
                "n_train_dup_exact": len(self.train_exact), "n_train_dup_near": len(self.train_near)}


def find_duplicates(train: Sequence[tuple[str, str]], test: Sequence[str],
                    fingerprints: dict[str, Fingerprint]) -> Duplicates:
    """``train``: (path, group) with the image's own id as its group when there are no groups;
    ``test``: paths; ``fingerprints``: path -> Fingerprint (every image listed)."""
    train_paths = [path for path, _ in train]
    train_hashes = hashes(train_paths, fingerprints)
    groups = np.unique([group for _, group in train], return_inverse=True)[1]
    train_exact = exact_across_groups(train, fingerprints)
    test_exact = exact_in(test, train_paths, fingerprints)
    train_near = near_matches(train_paths, nearest_hashes(train_hashes, train_hashes, groups, groups), train_paths,
                              train_exact)
    test_near = near_matches(test, nearest_hashes(hashes(test, fingerprints), train_hashes), train_paths, test_exact)
    return Duplicates(test_exact, test_near, train_exact, train_near)


def near_matches(paths: Sequence[str], found: tuple[np.ndarray, np.ndarray], pool: Sequence[str],
                 exact: list[Match]) -> list[Match]:
    """The images of ``paths`` whose nearest pool hash (``nearest_hashes``) is within NEAR_BITS, less
    the exact duplicates."""
    bits, nearest = found
    already = {match.path for match in exact}
    return [Match(path, pool[j], int(d)) for path, d, j in zip(paths, bits, nearest, strict=True)
            if d <= NEAR_BITS and path not in already]


def exact_in(paths: Sequence[str], pool: Sequence[str], fingerprints: dict[str, Fingerprint]) -> list[Match]:
    """The images of ``paths`` whose bytes are those of an image of ``pool``."""
    first = {}
    for other in pool:
        first.setdefault(fingerprints[other].digest, other)
    return [Match(path, first[fingerprints[path].digest], 0) for path in paths if fingerprints[path].digest in first]


def exact_across_groups(train: Sequence[tuple[str, str]], fingerprints: dict[str, Fingerprint]) -> list[Match]:
    """Train images whose bytes are those of a train image of another group."""
    by_digest: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path, group in train:
        by_digest[fingerprints[path].digest].append((path, group))
    found = []
    for path, group in train:
        other = next((p for p, g in by_digest[fingerprints[path].digest] if g != group), None)
        if other is not None:
            found.append(Match(path, other, 0))
    return found


def hashes(paths: Sequence[str], fingerprints: dict[str, Fingerprint]) -> np.ndarray:
    return np.array([fingerprints[p].dhash for p in paths], dtype=np.uint64)


def nearest_hashes(queries: np.ndarray, pool: np.ndarray, query_groups: np.ndarray | None = None,
                   pool_groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each query hash, the fewest bits it differs by from a pool hash (of another group, with
    groups) and that pool hash's index; NO_MATCH where there is none. Brute force in chunks: State
    Farm's 80k test x 22k train hashes take seconds, a fraction of decoding the images."""
    bits = np.full(len(queries), NO_MATCH, dtype=np.uint8)
    nearest = np.zeros(len(queries), dtype=np.int64)
    if not len(pool):
        return bits, nearest
    for start in range(0, len(queries), CHUNK):
        chunk = slice(start, start + CHUNK)
        distance = popcount(queries[chunk, None] ^ pool[None, :]).astype(np.uint8, copy=False)
        if query_groups is not None and pool_groups is not None:
            distance[query_groups[chunk, None] == pool_groups[None, :]] = NO_MATCH
        nearest[chunk] = distance.argmin(axis=1)
        bits[chunk] = distance[np.arange(len(distance)), nearest[chunk]]
    return bits, nearest


def popcount(values: np.ndarray) -> np.ndarray:
    """Set bits per uint64 (numpy >= 2 has it built in; the SWAR sum otherwise)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    v = values - ((values >> np.uint64(1)) & np.uint64(0x5555555555555555))
    v = (v & np.uint64(0x3333333333333333)) + ((v >> np.uint64(2)) & np.uint64(0x3333333333333333))
    v = (v + (v >> np.uint64(4))) & np.uint64(0x0F0F0F0F0F0F0F0F)
    return (v * np.uint64(0x0101010101010101)) >> np.uint64(56)
