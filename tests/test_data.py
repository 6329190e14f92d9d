"""Image loading and augmentation: reduced decode, uint8, determinism per copy and worker, no flips."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pipeline.config import AugmentConfig
from pipeline.data import (
    ImageRowsDataset,
    build_augmentation,
    decode_image,
    flip_transforms,
    jpeg_size,
    reduction_factor,
    seed_worker,
)
from pipeline.errors import BadInputError


def asymmetric_frame(width: int = 640, height: int = 480, seed: int = 0) -> np.ndarray:
    """A smooth frame that is far from its own mirror image (dark left, bright structured right)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width]).reshape(2, 1, 1)
    base = np.stack([255 * x ** 2, 128 + 100 * np.sin(8 * y + 3 * x), 255 * x * y], axis=-1)
    base[: height // 3, : width // 4] = (250, 30, 30)  # a red block top left
    return np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def frame_path(tmp_path):
    path = tmp_path / "img_1.jpg"
    Image.fromarray(asymmetric_frame()).save(path, quality=90)
    return path


def test_jpeg_header_and_reduction_factor(frame_path):
    assert jpeg_size(frame_path.read_bytes()) == (640, 480)
    assert jpeg_size(b"\x89PNG....") is None
    assert reduction_factor((640, 480), (224, 224)) == 2  # 320x240 still covers 224x224
    assert reduction_factor((640, 480), (96, 128)) == 4
    assert reduction_factor((640, 480), (48, 64)) == 8
    assert reduction_factor((640, 480), (480, 640)) == 1


@pytest.mark.parametrize("target", [(224, 224), (96, 128), (48, 64)])
def test_reduced_decode_is_uint8_rgb_and_close_to_a_full_decode(frame_path, target):
    image = decode_image(frame_path, target)
    assert image.shape == (*target, 3) and image.dtype == np.uint8
    full = np.asarray(Image.open(frame_path).convert("RGB").resize(target[::-1], Image.Resampling.BOX), dtype=float)
    assert np.abs(image.astype(float) - full).mean() < 4  # same picture, RGB order (not BGR)
    assert image[: target[0] // 4, : target[1] // 8, 0].mean() > 200  # the red block stays red, top left


def test_decode_of_a_non_jpeg_and_of_garbage(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(asymmetric_frame(64, 48)).save(png)
    assert decode_image(png, (24, 32)).shape == (24, 32, 3)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(BadInputError, match="bad.jpg"):
        decode_image(bad, (24, 32))


def test_items_are_uint8_chw_tensors_with_labels(frame_path):
    ds = ImageRowsDataset([frame_path, frame_path], (48, 64), labels=[3, 7])
    image, label = ds[1]
    assert image.dtype == torch.uint8 and image.shape == (3, 48, 64) and label == 7
    assert ImageRowsDataset([frame_path], (48, 64))[0][1] == -1


def test_augmented_copies_are_reproducible_distinct_and_copy_zero_is_plain(frame_path, tmp_path):
    other = tmp_path / "img_2.jpg"
    Image.fromarray(asymmetric_frame(seed=1)).save(other, quality=90)
    paths = [frame_path, frame_path, frame_path, other, other]
    copies = [0, 1, 2, 1, 2]
    aug = AugmentConfig()

    def images(seed: int, order: list[int]) -> dict[int, np.ndarray]:
        ds = ImageRowsDataset(paths, (96, 128), copies=copies, augmentation=build_augmentation(aug), seed=seed)
        return {i: ds[i][0].numpy() for i in order}

    a = images(0, [0, 1, 2, 3, 4])
    b = images(0, [4, 2, 3, 1, 0])  # another visiting order, a fresh transform: the same pixels
    for i in a:
        assert np.array_equal(a[i], b[i])
    plain = ImageRowsDataset([frame_path], (96, 128))[0][0].numpy()
    assert np.array_equal(a[0], plain)  # copy 0 is never augmented
    assert not np.array_equal(a[1], a[2]) and not np.array_equal(a[1], plain)
    assert not np.array_equal(a[3], a[4])
    c = images(1, [1])
    assert not np.array_equal(a[1], c[1])  # another seed, another augmentation


def test_no_augmentation_means_plain_images_for_every_copy(frame_path):
    ds = ImageRowsDataset([frame_path] * 3, (48, 64), copies=[0, 1, 2], augmentation=None)
    assert all(np.array_equal(ds[0][0], ds[i][0]) for i in (1, 2))


def test_augmentation_does_not_depend_on_dataloader_workers(frame_path):
    paths = [frame_path] * 8
    ds = ImageRowsDataset(paths, (48, 64), copies=list(range(8)), augmentation=build_augmentation(AugmentConfig()), seed=3)
    single = torch.cat([x for x, _ in DataLoader(ds, batch_size=2, num_workers=0)])
    multi = torch.cat([x for x, _ in DataLoader(ds, batch_size=2, num_workers=2, worker_init_fn=seed_worker)])
    assert torch.equal(single, multi)
    assert len({x.numpy().tobytes() for x in single}) == 8  # each copy its own augmentation


def test_augmentation_never_flips(frame_path):
    transform = build_augmentation(AugmentConfig())
    assert flip_transforms(transform) == []
    assert flip_transforms(A.Compose([A.Affine(), A.OneOf([A.HorizontalFlip()])])) == ["HorizontalFlip"]
    assert {type(t).__name__ for t in transform.transforms} == {"Affine", "RandomBrightnessContrast", "RGBShift"}

    # Behaviour: every augmented copy of an asymmetric frame looks like the frame, not its mirror.
    ds = ImageRowsDataset([frame_path] * 25, (96, 128), copies=list(range(1, 26)), augmentation=transform)
    plain = ImageRowsDataset([frame_path], (96, 128))[0][0].float().flatten()
    mirror = ImageRowsDataset([frame_path], (96, 128))[0][0].flip(-1).float().flatten()
    for i in range(len(ds)):
        x = ds[i][0].float().flatten()
        assert torch.corrcoef(torch.stack([x, plain]))[0, 1] > torch.corrcoef(torch.stack([x, mirror]))[0, 1] + 0.2


def test_a_pure_shift_config_only_translates(frame_path):
    shift_only = AugmentConfig(rotate_deg=0, shift=0.1, scale=0, shear_deg=0, brightness=0, contrast=0,
                               channel_shift=0, border="constant")
    ds = ImageRowsDataset([frame_path] * 6, (96, 128), copies=list(range(1, 7)), augmentation=build_augmentation(shift_only))
    plain = ImageRowsDataset([frame_path], (96, 128))[0][0].numpy().astype(int)
    for i in range(len(ds)):
        x = ds[i][0].numpy().astype(int)
        # Find the integer shift that best explains the copy: it explains it almost exactly.
        best = min(
            (np.abs(x[:, max(dy, 0):96 + min(dy, 0), max(dx, 0):128 + min(dx, 0)]
                    - plain[:, max(-dy, 0):96 + min(-dy, 0), max(-dx, 0):128 + min(-dx, 0)]).mean(), dy, dx)
            for dy in range(-10, 11) for dx in range(-13, 14)
        )
        assert best[0] < 3, best


def test_labels_map_to_the_competition_class_order_and_unknown_ones_name_the_row():
    from pipeline.competition import label_indices

    classes = ("circle", "square", "triangle")
    assert label_indices(["triangle", "circle", ""], classes, allow_missing=True).tolist() == [2, 0, -1]
    with pytest.raises(BadInputError, match=r"labels.csv, row 3: label 'c1' is not a class"):
        label_indices(["circle", "c1"], classes, "labels.csv")  # never a silent -1
