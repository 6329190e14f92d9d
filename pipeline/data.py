"""Images in: fast JPEG decode, datasets over (path, label) rows, deterministic augmentation.

Decoding. A 640x480 frame is decoded straight to near the model size by libjpeg's reduced-DCT
decode (OpenCV ``IMREAD_REDUCED_COLOR_{2,4,8}``: the scaled inverse DCT is itself an anti-aliased
downscale), choosing the largest reduction that still leaves at least the target size; the
remaining < 2x step is a bilinear resize. Pixels stay uint8 all the way to the model, which
normalises them on its device (``pipeline.models.Normalize``). ``benchmarks/decode.py`` compares
this against PIL full decode + torchvision resize.

Augmentation (albumentations 2): affine (rotation, shift, scale, shear), brightness/contrast and a
per-channel shift, from ``cfg.augment``. Never a horizontal flip: it would turn right-hand classes
into left-hand ones. Validation and test rows are never augmented.

Determinism. Augmented copy ``k`` of an image is a pure function of ``(seed, k, image file name)``:
before each augmented sample the transform is reseeded with a seed derived from those three
(``sample_seed``). So the result does not depend on DataLoader workers (each worker holds a copy of
the same random state, which alone would make every worker augment identically), on the order
rows are visited, or on which subset (full split, sample, resumed chunk) an image appears in.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.config import AugmentConfig
from pipeline.errors import BadInputError

REDUCED_FLAGS = {
    1: cv2.IMREAD_COLOR,
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
BORDERS = {"reflect": cv2.BORDER_REFLECT_101, "replicate": cv2.BORDER_REPLICATE, "constant": cv2.BORDER_CONSTANT}
# JPEG start-of-frame markers (baseline, progressive, ...); C4/C8/CC are other segment types.
SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

# One OpenCV thread per process. Parallelism comes from DataLoader workers, and OpenCV's own pool
# (a thread per core in every worker) oversubscribes the CPU: 14 workers on 16 cores ran warpAffine
# on 224 threads and the augmented loader fell from ~770 to ~110 images/s per worker. Set at import,
# before any worker forks: changing it inside a forked worker can deadlock on the parent's pool.
cv2.setNumThreads(1)


# ---------------------------------------------------------------------------- decode


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame header, or None when ``data`` is not a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in SOF_MARKERS:
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            return width, height
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def reduction_factor(size_wh: tuple[int, int], target_hw: tuple[int, int]) -> int:
    """The largest DCT reduction (1, 2, 4, 8) that still decodes to at least the target size."""
    width, height = size_wh
    target_h, target_w = target_hw
    for factor in (8, 4, 2):
        if width // factor >= target_w and height // factor >= target_h:
            return factor
    return 1


def resize_to(image: np.ndarray, target_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear for the small (< 2x) step left after a reduced decode; area averaging beyond that."""
    h, w = image.shape[:2]
    target_h, target_w = target_hw
    if (h, w) == (target_h, target_w):
        return image
    shrink = max(h / target_h, w / target_w)
    interpolation = cv2.INTER_AREA if shrink > 2 else cv2.INTER_LINEAR
    return cv2.resize(image, (target_w, target_h), interpolation=interpolation)


def decode_image(path: Path | str, target_hw: tuple[int, int]) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` at ``target_hw``, decoded at reduced DCT scale when it is a JPEG."""
    data = np.fromfile(str(path), dtype=np.uint8)
    size = jpeg_size(data[:65536].tobytes())
    factor = reduction_factor(size, target_hw) if size is not None else 1
    image = cv2.imdecode(data, REDUCED_FLAGS[factor] | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise BadInputError(path, "cannot decode image")
    image = resize_to(image, target_hw)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def to_chw_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC uint8 array -> CHW uint8 tensor without a copy: a channels-last view, the layout the
    conv base runs in anyway (no float conversion either: the model normalises on its device)."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


# ---------------------------------------------------------------------------- augmentation


def build_augmentation(aug: AugmentConfig) -> A.Compose:
    """The train-time augmentation for cached copies and fine-tuning. Every transform is applied
    (p=1) with parameters drawn from ranges centred on "no change". No flips, by design."""
    return A.Compose(
        [
            A.Affine(
                rotate=(-aug.rotate_deg, aug.rotate_deg),
                translate_percent=(-aug.shift, aug.shift),
                scale=(1 - aug.scale, 1 + aug.scale),
                shear=(-aug.shear_deg, aug.shear_deg),
                interpolation=cv2.INTER_LINEAR,
                border_mode=BORDERS[aug.border],
                fill=0,
                p=1.0,
            ),
            A.RandomBrightnessContrast(brightness_limit=aug.brightness, contrast_limit=aug.contrast, p=1.0),
            A.RGBShift(r_shift_limit=aug.channel_shift, g_shift_limit=aug.channel_shift,
                       b_shift_limit=aug.channel_shift, p=1.0),
        ],
        seed=0,
    )


def flip_transforms(transform: A.BaseCompose) -> list[str]:
    """Names of any flip/transpose transforms inside ``transform`` (must be empty)."""
    names: list[str] = []
    for t in transform.transforms:
        if isinstance(t, A.BaseCompose):
            names += flip_transforms(t)
        elif "flip" in type(t).__name__.lower() or type(t).__name__ in ("Transpose", "D4"):
            names.append(type(t).__name__)
    return names


def image_key(path_or_name: Path | str) -> int:
    """A stable integer for an image, from its file name (crc32)."""
    return zlib.crc32(Path(path_or_name).name.encode())


def sample_seed(seed: int, copy: int, key: int) -> int:
    """The augmentation seed of copy ``copy`` of the image with key ``key``."""
    return int(np.random.SeedSequence([int(seed), int(copy), int(key)]).generate_state(1)[0])


def augment(transform: A.Compose, image: np.ndarray, seed: int) -> np.ndarray:
    transform.set_random_seed(seed)
    return transform(image=image)["image"]


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: distinct, reproducible global RNGs per worker. (Augmentation
    does not rely on them: it is reseeded per sample.)"""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


# ---------------------------------------------------------------------------- datasets


class ImageRowsDataset(Dataset):
    """Rows of (image path, label, copy): item ``i`` is ``(uint8 CHW tensor, label)``.

    Copy 0 is the plain image; copy ``k >= 1`` is augmented with seed ``(seed, k, file name)`` when
    an augmentation is given. Labels are class indices (-1 for unlabelled test images)."""

    def __init__(self, paths: Sequence[Path | str], target_hw: tuple[int, int], labels: Sequence[int] | None = None,
                 copies: Sequence[int] | None = None, augmentation: A.Compose | None = None, seed: int = 0):
        self.paths = [str(p) for p in paths]
        self.target_hw = (int(target_hw[0]), int(target_hw[1]))
        self.labels = np.full(len(self.paths), -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
        self.copies = np.zeros(len(self.paths), dtype=np.int64) if copies is None else np.asarray(copies, dtype=np.int64)
        if not len(self.labels) == len(self.copies) == len(self.paths):
            raise ValueError("paths, labels and copies must have the same length")
        self.augmentation = augmentation
        self.seed = int(seed)
        self.keys = [image_key(p) for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> np.ndarray:
        image = decode_image(self.paths[i], self.target_hw)
        copy = int(self.copies[i])
        if copy > 0 and self.augmentation is not None:
            image = augment(self.augmentation, image, sample_seed(self.seed, copy, self.keys[i]))
        return image

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return to_chw_tensor(self.load(i)), int(self.labels[i])
