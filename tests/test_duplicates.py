"""pipeline.ingest.duplicates: what counts as an exact or a near duplicate between train and test and across
training groups (ingest reports the counts; tests/test_ingest.py checks them end to end)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from pipeline.ingest import duplicates
from pipeline.ingest.duplicates import (
    NEAR_BITS,
    Fingerprint,
    difference_hash,
    find_duplicates,
    nearest_hashes,
)


def photo(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A photo-like picture: a gradient and a few filled shapes (noise has no stable perceptual hash)."""
    rng = np.random.default_rng(seed)
    ramp = Image.linear_gradient("L").resize(size).rotate(int(rng.integers(4)) * 90)
    image = Image.merge("RGB", [ramp, ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT), ramp])
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x, y = int(rng.integers(size[0])), int(rng.integers(size[1]))
        draw.rectangle((x, y, x + size[0] // 5, y + size[1] // 5), fill=tuple(int(v) for v in rng.integers(256, size=3)))
    return image


def reencoded(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer)


def bits_apart(a: Image.Image, b: Image.Image) -> int:
    return bin(difference_hash(a) ^ difference_hash(b)).count("1")


@pytest.mark.parametrize("seed", range(3))
def test_a_reencoded_resized_or_brightened_copy_is_near_and_another_picture_is_not(seed):
    original = photo(seed)
    for copy in (reencoded(original, 40), original.resize((320, 240)), ImageEnhance.Brightness(original).enhance(1.1)):
        assert bits_apart(original, copy) <= NEAR_BITS
    assert bits_apart(original, photo(seed + 100)) > 3 * NEAR_BITS


def prints(**hashes: tuple[str, int]) -> dict[str, Fingerprint]:
    return {path: Fingerprint(digest, dhash) for path, (digest, dhash) in hashes.items()}


def test_exact_and_near_duplicates_between_train_and_test():
    fingerprints = prints(a=("A", 0b1111), b=("B", 0xFFFF_0000), t1=("A", 0b1111), t2=("X", 0b0111),
                          t3=("Y", 0xF0F0_F0F0_F0F0))
    found = find_duplicates([("a", "g1"), ("b", "g2")], ["t1", "t2", "t3"], fingerprints)
    assert [(m.path, m.other, m.bits) for m in found.test_exact] == [("t1", "a", 0)]
    assert [(m.path, m.other, m.bits) for m in found.test_near] == [("t2", "a", 1)]  # an exact one is not also near
    assert found.figures() == {"n_test_dup_exact": 1, "n_test_dup_near": 1, "n_train_dup_exact": 0, "n_train_dup_near": 0}


def test_train_duplicates_count_only_across_groups():
    """One driver's consecutive frames repeat each other (no leak); a frame under two drivers leaks."""
    fingerprints = prints(a=("A", 0xFFFF), a2=("A", 0xFFFF), b=("B", 1 << 40), c=("B", 1 << 40), d=("D", (1 << 40) | 1))
    found = find_duplicates([("a", "p1"), ("a2", "p1"), ("b", "p1"), ("c", "p2"), ("d", "p3")], [], fingerprints)
    assert sorted((m.path, m.other) for m in found.train_exact) == [("b", "c"), ("c", "b")]
    assert sorted(m.path for m in found.train_near) == ["d"]  # 1 bit from b and c, other drivers
    without_groups = find_duplicates([(p, p) for p in ("a", "a2")], [], fingerprints)  # each image its own group
    assert sorted(m.path for m in without_groups.train_exact) == ["a", "a2"]


def test_nearest_hashes_across_chunks_and_with_nothing_to_compare(monkeypatch):
    monkeypatch.setattr(duplicates, "CHUNK", 2)
    pool = np.array([0, 0xFF, 1 << 63], dtype=np.uint64)
    queries = np.array([1, 0xFE, (1 << 63) | 3, 0], dtype=np.uint64)
    bits, nearest = nearest_hashes(queries, pool)
    assert bits.tolist() == [1, 1, 2, 0] and nearest.tolist() == [0, 1, 2, 0]
    groups = np.array([0, 0, 1])  # a hash is compared with those of other groups only
    bits, nearest = nearest_hashes(pool, pool, groups, groups)
    assert bits.tolist() == [1, 9, 1] and nearest.tolist() == [2, 2, 0]
    one_group = np.zeros(3, dtype=int)
    assert nearest_hashes(pool, pool, one_group, one_group)[0].tolist() == [duplicates.NO_MATCH] * 3
    assert nearest_hashes(queries, np.array([], dtype=np.uint64))[0].tolist() == [duplicates.NO_MATCH] * 4


def test_popcount_without_numpys_own(monkeypatch):
    values = np.random.default_rng(0).integers(0, 2**63, 1000, dtype=np.uint64) | np.uint64(1 << 63)
    expected = [bin(int(v)).count("1") for v in values]
    assert duplicates.popcount(values).tolist() == expected
    monkeypatch.delattr(np, "bitwise_count", raising=False)
    assert duplicates.popcount(values).tolist() == expected
