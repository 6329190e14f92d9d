"""A synthetic competition in Kaggle's CSV layout without groups: coloured shapes on noisy backgrounds.

State Farm ships class folders (``imgs/train/c0..c9``), a driver list that groups images, and ``c<N>``
class names. Many other Kaggle image competitions look like this instead, and the pipeline must handle
both::

    train.csv                image_id,label           (label = a class NAME, e.g. "triangle")
    train_images/<id>.jpg    flat folder, no class subfolders
    test_images/<id>.jpg
    sample_submission.csv    image_id,<one probability column per class name>

There are no groups (every image is independent, so a random split is honest), the class names are
words rather than ``c<N>``, and the default class count (5) is not 10, so nothing may hard-code State
Farm's ten classes. The hidden test labels go to ``hidden_dir/test_labels.csv`` (``id,label``) for
scoring only.

Each image is one filled shape at a random position, scale, rotation and colour on a textured random
background. Colour is independent of class, so a model has to learn the shape itself; the shapes are
chosen to stay distinct under any rotation (no square-vs-diamond pair), so a tiny CNN learns them from a
few hundred images. Everything random comes from ``seed``: a plan (labels, ids, one sub-seed per image)
is drawn first and each image is then a pure function of its sub-seed, so the files are byte-identical
for the same arguments.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

TRAIN_CSV = "train.csv"
TRAIN_DIR = "train_images"
TEST_DIR = "test_images"
SUBMISSION_CSV = "sample_submission.csv"
HIDDEN_LABELS_CSV = "test_labels.csv"

ID_HEX_DIGITS = 10
MIN_SIDE = 16
SUBPIXEL_BITS = 4  # cv2.fillPoly takes fixed-point vertices; 4 bits = 1/16 pixel, so small shapes stay smooth
SCALE_RANGE = (0.20, 0.40)  # shape radius as a fraction of the shorter image side
MIN_CONTRAST = 70.0  # luma gap between shape and background colour, so the shape is always visible
TEXTURE_GRID = 5  # the background texture is a random 5x5 field blown up: soft blotches, not a flat fill
TEXTURE_SD = 22.0
NOISE_SD = 6.0  # per-pixel sensor noise over the whole image

# ---------------------------------------------------------------------------- shapes
# Each shape is a list of polygons in unit coordinates (all vertices within radius ~1 of the origin);
# the first polygon is filled, the rest are cut out as holes.

Polygons = list[np.ndarray]


def _regular(n: int, radius: float, phase: float = 0.0) -> np.ndarray:
    angles = phase + np.arange(n) * 2 * np.pi / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _circle() -> Polygons:
    return [_regular(48, 0.85)]


def _square() -> Polygons:
    return [_regular(4, 0.95, np.pi / 4)]


def _triangle() -> Polygons:
    return [_regular(3, 1.0, -np.pi / 2)]


def _cross() -> Polygons:
    arm, half = 0.95, 0.28
    quarter = [(half, half), (arm, half), (arm, -half), (half, -half)]
    # Walk the 12-vertex plus sign by rotating one quarter's vertices 4 times.
    points = [
        (x * c - y * s, x * s + y * c) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1)) for x, y in quarter
    ]
    return [np.array(points, dtype=float)]


def _ring() -> Polygons:
    return [_regular(48, 0.95), _regular(48, 0.55)]


def _star() -> Polygons:
    outer, inner = _regular(5, 1.0, -np.pi / 2), _regular(5, 0.4, -np.pi / 2 + np.pi / 5)
    return [np.stack([outer, inner], axis=1).reshape(-1, 2)]


def _bar() -> Polygons:
    length, width = 0.97, 0.24
    return [np.array([(-length, -width), (length, -width), (length, width), (-length, width)], dtype=float)]


def _crescent() -> Polygons:
    bite = _regular(48, 0.75) + np.array([0.45, 0.0])
    return [_regular(48, 0.9), bite]


SHAPES: dict[str, Callable[[], Polygons]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "ring": _ring,
    "star": _star,
    "bar": _bar,
    "crescent": _crescent,
}
CLASS_NAMES: tuple[str, ...] = tuple(SHAPES)
UNIT_SHAPES: dict[str, Polygons] = {name: make() for name, make in SHAPES.items()}


# ---------------------------------------------------------------------------- rendering


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def textured_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random base colour with soft low-frequency blotches, as float RGB (before sensor noise)."""
    base = rng.uniform(0, 255, size=3)
    field = rng.normal(0.0, TEXTURE_SD, size=(TEXTURE_GRID, TEXTURE_GRID, 3)).astype(np.float32)
    blotches = cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC)
    return base.astype(np.float32) + blotches


def contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """Any colour whose luma differs enough from the background's; drawn the same way for every class."""
    background_luma = _luma(background.reshape(-1, 3).mean(axis=0))
    while True:
        colour = rng.uniform(0, 255, size=3)
        if abs(_luma(colour) - background_luma) >= MIN_CONTRAST:
            return colour


def shape_mask(rng: np.random.Generator, shape: str, width: int, height: int) -> np.ndarray:
    """Antialiased 0..1 coverage of one shape at a random scale, rotation and position inside the frame."""
    radius = rng.uniform(*SCALE_RANGE) * min(width, height)
    angle = rng.uniform(0, 2 * np.pi)
    # Unit shapes fit in radius ~1, so keeping the centre one radius from the edges keeps them in frame.
    centre = np.array([rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    mask = np.zeros((height, width), dtype=np.uint8)
    for index, polygon in enumerate(UNIT_SHAPES[shape]):
        points = (polygon @ rotation.T) * radius + centre
        fixed = np.round(points * (1 << SUBPIXEL_BITS)).astype(np.int32)
        fill = 255 if index == 0 else 0  # later polygons are holes
        cv2.fillPoly(mask, [fixed], fill, lineType=cv2.LINE_AA, shift=SUBPIXEL_BITS)
    return mask.astype(np.float32) / 255.0


def render_image(shape: str, sub_seed: int, width: int, height: int) -> np.ndarray:
    """One RGB uint8 image; a pure function of its arguments."""
    rng = np.random.default_rng(sub_seed)
    background = textured_background(rng, width, height)
    colour = contrasting_colour(rng, background).astype(np.float32)
    coverage = shape_mask(rng, shape, width, height)[..., None]
    image = background * (1.0 - coverage) + colour * coverage
    image += rng.normal(0.0, NOISE_SD, size=image.shape).astype(np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def encode_jpeg(image_rgb: np.ndarray, quality: int) -> bytes:
    # Baseline and unoptimised explicitly, so the bytes do not hinge on OpenCV's defaults.
    params = [cv2.IMWRITE_JPEG_QUALITY, quality, cv2.IMWRITE_JPEG_PROGRESSIVE, 0]
    params += [cv2.IMWRITE_JPEG_OPTIMIZE, 0]
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode a JPEG")
    return buf.tobytes()


# ---------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Split:
    """One split's images in file-listing order: ids, class indices, and per-image render seeds."""

    ids: list[str]
    labels: np.ndarray
    sub_seeds: np.ndarray


def balanced_labels(rng: np.random.Generator, n_images: int, n_classes: int) -> np.ndarray:
    """Class indices as even as the count allows (sizes differ by at most one), in shuffled order."""
    labels = np.arange(n_images) % n_classes
    # Which classes get the extra image when n_images is not a multiple is random too.
    labels = rng.permutation(n_classes)[labels]
    return rng.permutation(labels)


def unique_hex_ids(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` distinct random 10-digit lowercase hex ids (Kaggle-style opaque image ids)."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        for value in rng.integers(0, 16**ID_HEX_DIGITS, size=count - len(ids)):
            image_id = f"{int(value):0{ID_HEX_DIGITS}x}"
            if image_id not in seen:
                seen.add(image_id)
                ids.append(image_id)
    return ids


def plan_splits(seed: int, n_classes: int, n_train: int, n_test: int) -> tuple[Split, Split]:
    rng = np.random.default_rng(seed)
    ids = unique_hex_ids(rng, n_train + n_test)  # drawn together so train and test never share an id
    train_labels = balanced_labels(rng, n_train, n_classes)
    test_labels = balanced_labels(rng, n_test, n_classes)
    sub_seeds = rng.integers(0, 2**63, size=n_train + n_test)
    train = Split(ids[:n_train], train_labels, sub_seeds[:n_train])
    # Test files are listed by id, as Kaggle's sample submission is.
    order = np.argsort(ids[n_train:], kind="stable")
    test = Split([ids[n_train:][i] for i in order], test_labels[order], sub_seeds[n_train:][order])
    return train, test


# ---------------------------------------------------------------------------- writing


def validate_arguments(
    n_classes: int, n_train: int, n_test: int, width: int, height: int, jpeg_quality: int
) -> None:
    if not 2 <= n_classes <= len(CLASS_NAMES):
        raise ValueError(f"n_classes must be between 2 and {len(CLASS_NAMES)}, got {n_classes}")
    if n_train < 2 * n_classes:
        raise ValueError(
            f"n_train must be at least 2 per class ({2 * n_classes} for {n_classes} classes), got {n_train}"
        )
    if n_test < 1:
        raise ValueError(f"n_test must be at least 1, got {n_test}")
    if width < MIN_SIDE or height < MIN_SIDE:
        raise ValueError(f"width and height must be at least {MIN_SIDE} pixels, got {width}x{height}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be between 1 and 100, got {jpeg_quality}")


def fresh_dir(path: Path) -> Path:
    """An empty image folder: stale images from an earlier run would not match the new CSVs."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def write_split_images(
    split: Split, classes: list[str], folder: Path, width: int, height: int, quality: int
) -> None:
    for image_id, label, sub_seed in zip(split.ids, split.labels, split.sub_seeds, strict=True):
        image = render_image(classes[label], int(sub_seed), width, height)
        (folder / f"{image_id}.jpg").write_bytes(encode_jpeg(image, quality))


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    lines = [",".join(header), *(",".join(row) for row in rows)]
    path.write_text("\n".join(lines) + "\n")


def write_tables(train: Split, test: Split, classes: list[str], out_dir: Path, hidden_dir: Path) -> None:
    write_csv(
        out_dir / TRAIN_CSV,
        ["image_id", "label"],
        [[image_id, classes[label]] for image_id, label in zip(train.ids, train.labels, strict=True)],
    )
    uniform = repr(1.0 / len(classes))
    write_csv(
        out_dir / SUBMISSION_CSV,
        ["image_id", *classes],
        [[image_id] + [uniform] * len(classes) for image_id in test.ids],
    )
    write_csv(
        hidden_dir / HIDDEN_LABELS_CSV,
        ["id", "label"],
        [[image_id, classes[label]] for image_id, label in zip(test.ids, test.labels, strict=True)],
    )


def generate(
    out_dir: Path,
    hidden_dir: Path,
    *,
    n_classes: int = 5,
    n_train: int = 300,
    n_test: int = 100,
    width: int = 64,
    height: int = 64,
    jpeg_quality: int = 90,
    seed: int = 4242,
) -> dict:
    """Writes the dataset into out_dir and the hidden test labels into hidden_dir.
    Returns {"n_train": ..., "n_test": ..., "n_classes": ..., "classes": [...], "seconds": ...}."""
    validate_arguments(n_classes, n_train, n_test, width, height, jpeg_quality)
    out_dir, hidden_dir = Path(out_dir), Path(hidden_dir)
    if hidden_dir.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(
            f"hidden labels must live outside the competition folder: {hidden_dir} is inside {out_dir}"
        )
    start = time.perf_counter()
    classes = list(CLASS_NAMES[:n_classes])
    train, test = plan_splits(seed, n_classes, n_train, n_test)
    out_dir.mkdir(parents=True, exist_ok=True)
    hidden_dir.mkdir(parents=True, exist_ok=True)
    write_split_images(train, classes, fresh_dir(out_dir / TRAIN_DIR), width, height, jpeg_quality)
    write_split_images(test, classes, fresh_dir(out_dir / TEST_DIR), width, height, jpeg_quality)
    write_tables(train, test, classes, out_dir, hidden_dir)
    return {
        "n_train": n_train,
        "n_test": n_test,
        "n_classes": n_classes,
        "classes": classes,
        "seconds": round(time.perf_counter() - start, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.synthetic.shapes", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "out_dir", type=Path, help="competition folder to write (train.csv, train_images/, ...)"
    )
    parser.add_argument("hidden_dir", type=Path, help="folder for test_labels.csv, outside out_dir")
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--classes", type=int, default=5, help=f"number of classes, 2..{len(CLASS_NAMES)}")
    parser.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("W", "H"))
    parser.add_argument("--seed", type=int, default=4242)
    args = parser.parse_args(argv)
    try:
        figures = generate(
            args.out_dir,
            args.hidden_dir,
            n_classes=args.classes,
            n_train=args.n_train,
            n_test=args.n_test,
            width=args.size[0],
            height=args.size[1],
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
