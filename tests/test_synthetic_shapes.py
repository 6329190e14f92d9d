"""The shapes competition: Kaggle's CSV layout, determinism, argument checks, and learnability from shape."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.synthetic import shapes

SMALL = {"n_classes": 3, "n_train": 12, "n_test": 4, "width": 24, "height": 24}


def first_line(path: Path) -> str:
    return path.read_text().splitlines()[0]


def digests(*folders: Path) -> dict[str, str]:
    return {
        f"{folder.name}/{p.relative_to(folder)}": hashlib.sha256(p.read_bytes()).hexdigest()
        for folder in folders
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The defaults: 5 classes, 300 train, 100 test, 64x64."""
    root = tmp_path_factory.mktemp("shapes")
    figures = shapes.generate(root / "raw", root / "hidden")
    return root / "raw", root / "hidden", figures


def test_class_names_are_words_not_state_farm_codes():
    assert len(CLASS_NAMES := shapes.CLASS_NAMES) >= 8
    assert len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    assert all(name == name.lower() and name.isalpha() for name in CLASS_NAMES)
    assert not any(re.fullmatch(r"c\d+", name) for name in CLASS_NAMES)


def test_layout_and_headers_are_kaggles_csv_layout(dataset):
    raw, hidden, figures = dataset
    classes = list(shapes.CLASS_NAMES[:5])
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        [shapes.TRAIN_CSV, shapes.TRAIN_DIR, shapes.TEST_DIR, shapes.SUBMISSION_CSV]
    )
    assert [p.name for p in hidden.iterdir()] == ["test_labels.csv"]
    assert first_line(raw / "train.csv") == "image_id,label"
    assert first_line(raw / "sample_submission.csv") == "image_id," + ",".join(classes)
    assert first_line(hidden / "test_labels.csv") == "id,label"
    for folder in (raw / "train_images", raw / "test_images"):  # flat: no class subfolders
        assert all(p.is_file() and p.suffix == ".jpg" for p in folder.iterdir())
    assert figures["n_train"] == 300 and figures["n_test"] == 100 and figures["n_classes"] == 5
    assert figures["classes"] == classes and figures["seconds"] >= 0


def test_tables_match_the_files_on_disk(dataset):
    raw, hidden, _ = dataset
    train = pd.read_csv(raw / "train.csv", dtype=str)
    submission = pd.read_csv(raw / "sample_submission.csv", dtype={"image_id": str})
    labels = pd.read_csv(hidden / "test_labels.csv", dtype=str)
    train_files = {p.stem for p in (raw / "train_images").iterdir()}
    test_files = {p.stem for p in (raw / "test_images").iterdir()}
    assert len(train) == 300 and train.image_id.is_unique and set(train.image_id) == train_files
    assert len(test_files) == 100 and not train_files & test_files
    assert all(re.fullmatch(r"[0-9a-f]{10}", i) for i in train_files | test_files)
    assert set(train.label) == set(labels.label) == set(shapes.CLASS_NAMES[:5])
    assert list(submission.image_id) == sorted(test_files) == list(labels.id)
    np.testing.assert_allclose(submission.drop(columns="image_id").to_numpy(), 0.2)
    np.testing.assert_allclose(submission.drop(columns="image_id").sum(axis=1), 1.0)


def test_classes_are_balanced_and_train_rows_are_shuffled(dataset):
    raw, hidden, _ = dataset
    train_labels = pd.read_csv(raw / "train.csv", dtype=str).label.tolist()
    for labels in (train_labels, pd.read_csv(hidden / "test_labels.csv", dtype=str).label.tolist()):
        counts = Counter(labels).values()
        assert min(counts) >= 2 and max(counts) - min(counts) <= 1
    assert train_labels != sorted(train_labels)


def test_uneven_counts_still_give_every_class_two_train_images(tmp_path):
    shapes.generate(
        tmp_path / "raw", tmp_path / "hidden", n_classes=8, n_train=16, n_test=3, width=16, height=16
    )
    train = pd.read_csv(tmp_path / "raw" / "train.csv", dtype=str)
    assert Counter(train.label) == dict.fromkeys(shapes.CLASS_NAMES, 2)
    submission = pd.read_csv(tmp_path / "raw" / "sample_submission.csv", dtype={"image_id": str})
    assert list(submission.columns[1:]) == list(shapes.CLASS_NAMES)
    np.testing.assert_allclose(submission.drop(columns="image_id").sum(axis=1), 1.0)


def test_images_are_baseline_rgb_jpegs_of_the_requested_size(tmp_path):
    shapes.generate(tmp_path / "raw", tmp_path / "hidden", **{**SMALL, "width": 48, "height": 32})
    paths = sorted((tmp_path / "raw").glob("*_images/*.jpg"))
    assert len(paths) == SMALL["n_train"] + SMALL["n_test"]
    for path in paths:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.shape == (32, 48, 3)
        data = path.read_bytes()
        assert b"\xff\xc0" in data and b"\xff\xc2" not in data  # SOF0 baseline, not progressive


def test_same_arguments_give_byte_identical_files(tmp_path):
    first = shapes.generate(tmp_path / "a" / "raw", tmp_path / "a" / "hidden", **SMALL)
    second = shapes.generate(tmp_path / "b" / "raw", tmp_path / "b" / "hidden", **SMALL)
    assert first.pop("seconds") >= 0 and second.pop("seconds") >= 0 and first == second
    a = digests(tmp_path / "a" / "raw", tmp_path / "a" / "hidden")
    assert a == digests(tmp_path / "b" / "raw", tmp_path / "b" / "hidden") and len(a) == 16 + 3


def test_a_different_seed_gives_different_images(tmp_path):
    shapes.generate(tmp_path / "a" / "raw", tmp_path / "a" / "hidden", **SMALL)
    shapes.generate(tmp_path / "b" / "raw", tmp_path / "b" / "hidden", **SMALL, seed=7)
    a, b = digests(tmp_path / "a" / "raw"), digests(tmp_path / "b" / "raw")
    assert not (set(a) & set(b)) - {"raw/train.csv", "raw/sample_submission.csv"}  # new ids
    assert not {v for k, v in a.items() if k.endswith(".jpg")} & set(b.values())  # new pixels


def test_rerun_into_the_same_folder_leaves_no_stale_images(tmp_path):
    shapes.generate(tmp_path / "raw", tmp_path / "hidden", **SMALL)
    shapes.generate(tmp_path / "raw", tmp_path / "hidden", **{**SMALL, "n_train": 6, "n_test": 2}, seed=1)
    train = pd.read_csv(tmp_path / "raw" / "train.csv", dtype=str)
    assert {p.stem for p in (tmp_path / "raw" / "train_images").iterdir()} == set(train.image_id)
    assert len(list((tmp_path / "raw" / "test_images").iterdir())) == 2


def test_class_changes_only_the_shape():
    # Same sub-seed, different class: background, colour, placement and noise are shared, so only the
    # pixels the two shapes cover differ, and colour cannot carry the label.
    circle = shapes.render_image("circle", 123, 64, 64).astype(int)
    cross = shapes.render_image("cross", 123, 64, 64).astype(int)
    differs = np.abs(circle - cross).max(axis=2) > 0
    assert 0.02 < differs.mean() < 0.5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_classes": 1}, "n_classes must be between 2 and 8"),
        ({"n_classes": 9}, "n_classes must be between 2 and 8"),
        ({"n_classes": 5, "n_train": 9}, "n_train must be at least 2 per class"),
        ({"n_test": 0}, "n_test must be at least 1"),
        ({"width": 15}, "width and height must be at least 16"),
        ({"height": 8}, "width and height must be at least 16"),
        ({"jpeg_quality": 0}, "jpeg_quality must be between 1 and 100"),
    ],
)
def test_bad_arguments_are_rejected_before_writing(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        shapes.generate(tmp_path / "raw", tmp_path / "hidden", **{**SMALL, **overrides})
    assert not (tmp_path / "raw").exists()


def test_hidden_labels_must_live_outside_the_competition_folder(tmp_path):
    with pytest.raises(ValueError, match="outside the competition folder"):
        shapes.generate(tmp_path / "raw", tmp_path / "raw" / "hidden", **SMALL)


def test_cli_prints_the_figures_as_json(tmp_path, capsys):
    argv = [
        str(tmp_path / "raw"),
        str(tmp_path / "hidden"),
        "--n-train",
        "8",
        "--n-test",
        "2",
        "--classes",
        "4",
        "--size",
        "20",
        "18",
        "--seed",
        "3",
    ]
    assert shapes.main(argv) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["classes"] == list(shapes.CLASS_NAMES[:4]) and figures["n_train"] == 8
    image = cv2.imread(str(next((tmp_path / "raw" / "test_images").iterdir())))
    assert image.shape == (18, 20, 3)
    with pytest.raises(SystemExit):
        shapes.main([str(tmp_path / "x"), str(tmp_path / "y"), "--classes", "1"])


# ---------------------------------------------------------------------------- learnability
# Plain linear models on hand-made features must beat chance clearly on the hidden test labels, so a
# tiny CNN certainly can: this fails if labels and pixels ever stop agreeing.


def load_grey(folder: Path, ids: list[str]) -> np.ndarray:
    return np.stack([cv2.imread(str(folder / f"{i}.jpg"), cv2.IMREAD_GRAYSCALE) for i in ids]).astype(
        np.float32
    )


def gradients(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude and direction of the lightly blurred grey gradient (the blur tames JPEG and sensor noise)."""
    smooth = np.stack([cv2.GaussianBlur(image, (5, 5), 1.0) for image in images])
    gy, gx = np.gradient(smooth, axis=(1, 2))
    return np.hypot(gx, gy), np.arctan2(gy, gx)


def hog_features(images: np.ndarray, cells: int = 4, bins: int = 9) -> np.ndarray:
    """HOG-like: per cell of a 4x4 grid, a magnitude-weighted histogram of unsigned edge directions."""
    magnitude, direction = gradients(images)
    bin_of = np.minimum((np.mod(direction, np.pi) / np.pi * bins).astype(int), bins - 1)
    n, height, width = images.shape
    one_hot = (bin_of[..., None] == np.arange(bins)) * magnitude[..., None]
    cells_view = one_hot[:, : height // cells * cells, : width // cells * cells].reshape(
        n, cells, height // cells, cells, width // cells, bins
    )
    features = cells_view.sum(axis=(2, 4)).reshape(n, -1)
    return features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-6)


def shape_signature(images: np.ndarray, angle_bins: int = 36, radius_bins: int = 12) -> np.ndarray:
    """Edge features that ignore position, rotation and scale: the Fourier magnitudes of the edge-direction
    histogram (corner symmetry: 3 for a triangle, 4 for a square) and the histogram of edge distances from
    the edge centroid relative to their mean (one radius for a circle, two for a ring)."""
    magnitude, direction = gradients(images)
    ys, xs = np.mgrid[: images.shape[1], : images.shape[2]]
    features = []
    for strength, angle in zip(magnitude, direction, strict=True):
        weight = strength**2 / (strength**2).sum()  # squared: strong shape edges outweigh texture and noise
        angles = np.histogram(
            np.mod(angle, 2 * np.pi), bins=angle_bins, range=(0, 2 * np.pi), weights=weight
        )[0]
        distance = np.hypot(ys - (weight * ys).sum(), xs - (weight * xs).sum())
        radii = np.histogram(
            distance / (weight * distance).sum(), bins=radius_bins, range=(0, 2), weights=weight
        )[0]
        features.append(np.concatenate([np.abs(np.fft.rfft(angles))[1:9], radii]))
    return np.array(features)


def holdout_accuracy(raw: Path, hidden: Path, featurize) -> float:
    train = pd.read_csv(raw / "train.csv", dtype=str)
    test = pd.read_csv(hidden / "test_labels.csv", dtype=str)
    x_train = featurize(load_grey(raw / "train_images", train.image_id.tolist()))
    x_test = featurize(load_grey(raw / "test_images", test.id.tolist()))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_train, train.label)
    return float(model.score(x_test, test.label))


def test_a_linear_model_on_hog_features_beats_chance_clearly(dataset):
    raw, hidden, _ = dataset
    assert holdout_accuracy(raw, hidden, hog_features) >= 2 / 5  # chance is 1/5; measured 0.60


def test_every_shape_is_learnable_from_its_outline(tmp_path):
    # All 8 classes: rotation, position, scale and colour vary, yet the outline alone identifies the shape.
    shapes.generate(tmp_path / "raw", tmp_path / "hidden", n_classes=8)
    assert holdout_accuracy(tmp_path / "raw", tmp_path / "hidden", shape_signature) >= 0.85  # measured 0.98
