"""The conv-feature cache format (pipeline/convfeatures/cache.py): chunk files written atomically and
recorded in the split's checksum record. The cache as the features stage writes and readers load it:
tests/test_features.py."""

from __future__ import annotations

import os

import numpy as np

from pipeline.convfeatures import cache as featurecache
from pipeline.io import file_sha256


def test_chunk_writes_are_atomic_and_recorded(tmp_path):
    path = tmp_path / "chunk_00000.npy"
    checksums: dict[int, str] = {}
    featurecache.write_chunk(tmp_path, 0, np.ones((3, 4), dtype=np.float16), checksums)
    assert featurecache.chunk_is_valid(path, 3, 4) and not featurecache.chunk_is_valid(path, 4, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk_00000.npy", featurecache.CHECKSUMS_FILE]
    assert featurecache.read_chunk_checksums(tmp_path) == checksums == {0: file_sha256(path)}
    path.write_bytes(path.read_bytes()[:40])  # a torn file (what a non-atomic write could leave)
    assert not featurecache.chunk_is_valid(path, 3, 4)
    assert os.path.getsize(path) == 40
