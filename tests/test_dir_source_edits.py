"""What `dvc repro` sees of an edited `dir` source (ingest's `${ingest.watch}` dependency): DVC compares
a file's size and modification time, and re-hashes only when one differs. An ordinary edit is seen; an
in-place edit keeping both is not (documented in pipeline/stages/ingest.py and the troubleshooting
guide: `dvc repro -f ingest`, or `touch` the file)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from checkout import copy_project
from test_flow import sh
from test_ingest import jpeg_bytes, make_statefarm_folder

IMAGE = "imgs/test/img_100.jpg"


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> tuple[Path, Path]:
    """A checkout whose ingest ran by `dvc repro` from a `dir` source: (checkout, source folder)."""
    base = tmp_path_factory.mktemp("dir-source")
    source = make_statefarm_folder(base / "competition")
    root = copy_project(base / "repo")
    sh(["git", "init", "-q"], root)
    sh([sys.executable, "-m", "pipeline", "configure", "--profile", "smoke", "--set", "ingest.source=dir",
        "--set", f"ingest.path={source}"], root)
    sh([sys.executable, "-m", "dvc", "repro", "ingest"], root)
    return root, source


def ingest_is_stale(root: Path) -> bool:
    return "ingest:" in sh([sys.executable, "-m", "dvc", "status", "ingest"], root)


def rewrite_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    before = path.stat()
    assert len(data) == before.st_size
    with open(path, "r+b") as f:  # in place: the same inode
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_an_in_place_edit_keeping_size_and_mtime_needs_a_touch(ingested):
    root, source = ingested
    assert not ingest_is_stale(root)
    image = source / IMAGE
    edited = bytearray(image.read_bytes())
    edited[-20] ^= 0xFF  # a byte of image data: same size, different pixels
    rewrite_keeping_size_and_mtime(image, bytes(edited))
    assert not ingest_is_stale(root)  # DVC's stat cache: size and mtime unchanged, so not re-hashed
    assert "Running stage 'ingest'" not in sh([sys.executable, "-m", "dvc", "repro", "ingest"], root)
    assert (root / "data/raw" / IMAGE).read_bytes() != image.read_bytes()  # data/raw holds its own copy

    image.touch()
    assert ingest_is_stale(root)
    assert "Running stage 'ingest'" in sh([sys.executable, "-m", "dvc", "repro", "ingest"], root)
    assert (root / "data/raw" / IMAGE).read_bytes() == image.read_bytes()


def test_an_ordinary_edit_is_seen(ingested):
    root, source = ingested
    (source / IMAGE).write_bytes(jpeg_bytes(4242, (20, 14)))  # another image: new size and mtime
    assert ingest_is_stale(root)
    assert "Running stage 'ingest'" in sh([sys.executable, "-m", "dvc", "repro", "ingest"], root)
    assert not ingest_is_stale(root)
