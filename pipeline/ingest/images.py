"""The decode check of every image: a file named .jpg must hold JPEG bytes, every image must decode
completely (JPEGs at 1/8 scale), EXIF rotations are noticed; each image that decodes gets its
fingerprint (pipeline.ingest.duplicates). Large sets run in a spawned process pool whose workers end
with this process."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path, PurePosixPath
from typing import Literal

from PIL import Image, ImageFile

from pipeline.env import die_with_parent
from pipeline.errors import BadInputError
from pipeline.ingest.duplicates import HASHED_SIDE, Fingerprint, fingerprint

JPEG_MAGIC = b"\xff\xd8\xff"
OTHER_FORMATS = {b"\x89PN": "PNG", b"GIF": "GIF", b"BM": "BMP", b"RIF": "RIFF/WebP", b"II*": "TIFF", b"MM\x00": "TIFF"}
# Below this many images a process pool costs more to start than it saves.
POOL_MIN_IMAGES = 2000

# rotated: decodes, but carries an EXIF orientation the pipeline does not apply (a notice, not an error).
Problem = tuple[Literal["not_jpeg", "corrupt", "rotated"], str]
EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageCheck:
    problem: Problem | None  # None: a complete image with nothing to say
    fingerprint: Fingerprint | None = None  # of an image that decodes, for pipeline.ingest.duplicates


@dataclass(frozen=True)
class ImageFindings:
    quarantined: list[tuple[str, str, str]]  # (file name, path, reason)
    rotated: list[str]
    fingerprints: dict[str, Fingerprint]  # path -> fingerprint of every image that decodes


def verify_images(build: Path, origin: Path, paths: list[str], on_corrupt: str) -> ImageFindings:
    """Decode-check every image. A non-JPEG always fails; a corrupt JPEG fails or, with
    ``on_corrupt=quarantine``, is returned as (img, path, reason). Also returns the paths of images
    with an EXIF rotation and the fingerprint of every image that decodes."""
    findings = ImageFindings([], [], {})
    for path, check in zip(paths, inspect_images([str(build / p) for p in paths]), strict=True):
        if check.fingerprint is not None:
            findings.fingerprints[path] = check.fingerprint
        if check.problem is None:
            continue
        kind, reason = check.problem
        if kind == "rotated":
            findings.rotated.append(path)
            continue
        if kind == "not_jpeg" or on_corrupt == "error":
            raise BadInputError(origin / path, reason)
        findings.quarantined.append((PurePosixPath(path).name, path, reason))
    return findings


def announce_exif_rotation(rotated: list[str], n_images: int) -> None:
    """Images are used as stored, EXIF orientation ignored (pipeline/data.py decodes with
    IMREAD_IGNORE_ORIENTATION, train and test alike, as Kaggle's own images need). Say so once when the
    data carries rotations, since a phone photo shown upright elsewhere is then seen on its side."""
    if rotated:
        print(f"[ingest] notice: {len(rotated)} of {n_images} images carry an EXIF orientation (first: {rotated[0]}); "
              "the pipeline uses the stored pixels as they are, not rotated, for training and test alike",
              file=sys.stderr, flush=True)


def inspect_images(paths: list[str]) -> Iterator[ImageCheck]:
    """inspect_image over ``paths``, in order; a process pool of cpu_count workers for large sets."""
    workers = os.cpu_count() or 1
    if len(paths) < POOL_MIN_IMAGES or workers < 2:
        yield from map(inspect_image, paths)
        return
    # spawn, not fork: the caller may be a threaded Prefect worker, where forking can deadlock. The
    # workers end with this process, even when it is killed (no orphans decoding on after a kill).
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=die_with_parent,
                               initargs=(os.getpid(),))
    try:
        yield from pool.map(inspect_image, paths, chunksize=max(1, min(256, len(paths) // (workers * 8))))
    finally:  # on the first error, drop the queued work instead of decoding the rest
        pool.shutdown(wait=True, cancel_futures=True)


JPEG_NAMES = (".jpg", ".jpeg")


def inspect_image(path: str) -> ImageCheck:
    """A complete image's fingerprint (plus its EXIF rotation notice, if any); else the problem
    ("not_jpeg" | "corrupt", reason). A file named .jpg must hold JPEG bytes; other extensions the spec
    allows (e.g. .png) must decode as what they are. The file is read once, for the digest and the decode."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return ImageCheck(("corrupt", f"unreadable ({err.strerror})"))
    if len(data) < 3:
        return ImageCheck(("corrupt", "empty or truncated file"))
    jpeg = data.startswith(JPEG_MAGIC)
    if not jpeg and path.lower().endswith(JPEG_NAMES):
        kind = next((name for magic, name in OTHER_FORMATS.items() if data.startswith(magic)), "unknown")
        return ImageCheck(("not_jpeg", f"not a JPEG file (content: {kind} data, starts with bytes {data[:3].hex()})"))
    try:
        image = decode(data, jpeg)
    except Exception as err:  # any failure to decode untrusted bytes means a corrupt file
        kind = "JPEG" if jpeg else "image"
        return ImageCheck(("corrupt", f"corrupt {kind}: does not decode ({type(err).__name__}: {err})"))
    with image:
        return ImageCheck(rotation_notice(image), fingerprint(data, image))


def rotation_notice(image: Image.Image) -> Problem | None:
    orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    return ("rotated", f"EXIF orientation {orientation}") if orientation not in (0, 1) else None


def decode(data: bytes, jpeg: bool = True) -> Image.Image:
    """The decoded image. A JPEG is decoded at 1/8 scale (reduced DCT, ~5x faster than a full decode),
    at most down to HASHED_SIDE pixels a side; that still reads every byte, so truncation and broken
    headers are caught, and a truncated frame fails instead of decoding with a grey bottom."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        image = Image.open(io.BytesIO(data))
        if jpeg:
            if image.format not in ("JPEG", "MPO"):  # MPO: a JPEG with extra frames (phone cameras), decodes as JPEG
                raise ValueError(f"content is {image.format}, not JPEG")
            image.draft("RGB", (max(HASHED_SIDE, image.width // 8), max(HASHED_SIDE, image.height // 8)))
        image.load()
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    return image
