"""The embedded synthetic dataset: Kaggle layout, counts, determinism, and the near-duplicate structure."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import SyntheticConfig, load_profile
from pipeline.io import file_sha256
from pipeline.synthetic import drivers as synthetic
from pipeline.synthetic.drivers import CLASSES

HEADER_DRIVERS = "subject,classname,img"
HEADER_SUBMISSION = "img," + ",".join(CLASSES)


@pytest.fixture(scope="module")
def smoke_synthetic() -> SyntheticConfig:
    return load_profile("smoke").ingest.synthetic


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, smoke_synthetic) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("synthetic")
    figures = synthetic.generate(smoke_synthetic, root / "raw", root / "hidden")
    return root / "raw", root / "hidden", figures


def file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def first_line(path: Path) -> str:
    return path.read_text().splitlines()[0]


def test_layout_and_headers_are_kaggles(dataset):
    raw, _, _ = dataset
    assert sorted(p.name for p in raw.iterdir()) == ["driver_imgs_list.csv", "imgs", "sample_submission.csv"]
    assert sorted(p.name for p in (raw / "imgs").iterdir()) == ["test", "train"]
    assert sorted(p.name for p in (raw / "imgs" / "train").iterdir()) == sorted(CLASSES)
    assert first_line(raw / "driver_imgs_list.csv") == HEADER_DRIVERS
    assert first_line(raw / "sample_submission.csv") == HEADER_SUBMISSION
    assert all(p.suffix == ".jpg" and p.is_file() for p in (raw / "imgs" / "test").iterdir())


def test_files_on_disk_match_the_lists(dataset):
    raw, _, _ = dataset
    drivers = pd.read_csv(raw / "driver_imgs_list.csv")
    listed_train = {f"{c}/{i}" for c, i in zip(drivers.classname, drivers.img, strict=True)}
    on_disk_train = {f"{p.parent.name}/{p.name}" for p in (raw / "imgs" / "train").rglob("*.jpg")}
    assert listed_train == on_disk_train
    submission = pd.read_csv(raw / "sample_submission.csv")
    assert set(submission.img) == {p.name for p in (raw / "imgs" / "test").iterdir()}
    assert (submission[list(CLASSES)] == 0.1).all().all()


def test_image_names_are_unique_and_shuffled(dataset):
    raw, _, _ = dataset
    train = pd.read_csv(raw / "driver_imgs_list.csv")
    test = pd.read_csv(raw / "sample_submission.csv")
    names = list(train.img) + list(test.img)
    assert len(set(names)) == len(names)
    assert all(re.fullmatch(r"img_\d+\.jpg", n) for n in names)
    ids = train.assign(n=train.img.str.extract(r"(\d+)", expand=False).astype(int))
    # Numbering carries no class: every class's id range overlaps the others'.
    ranges = ids.groupby("classname").n.agg(["min", "max"])
    assert (ranges["min"] < ranges["max"].min()).all() and (ranges["max"] > ranges["min"].max()).all()


def test_counts_match_config(dataset, smoke_synthetic):
    raw, hidden, figures = dataset
    cfg = smoke_synthetic
    train = pd.read_csv(raw / "driver_imgs_list.csv")
    test = pd.read_csv(hidden / "test_labels.csv")
    per_driver = train.groupby("subject").size()
    assert len(per_driver) == cfg.n_train_drivers
    assert per_driver.between(*cfg.train_per_driver).all()
    assert len(test) == cfg.n_test and test["group"].nunique() == cfg.n_test_drivers
    assert figures["n_train"] == len(train) and figures["n_test"] == len(test)
    assert figures["n_train_drivers"] == cfg.n_train_drivers and figures["n_test_drivers"] == cfg.n_test_drivers
    assert figures["seconds"] > 0 and figures["images_per_s"] > 0


def test_every_train_driver_has_all_classes_and_counts_are_unequal(dataset):
    raw, _, _ = dataset
    train = pd.read_csv(raw / "driver_imgs_list.csv")
    table = pd.crosstab(train.subject, train.classname)
    assert list(table.columns) == list(CLASSES)
    assert (table > 0).all().all()
    assert table.sum(axis=1).nunique() > 1 and table.sum(axis=0).nunique() > 1


def test_test_drivers_are_unseen_in_train(dataset):
    raw, hidden, _ = dataset
    train = pd.read_csv(raw / "driver_imgs_list.csv")
    test = pd.read_csv(hidden / "test_labels.csv")
    assert all(re.fullmatch(r"p\d{3}", s) for s in set(train.subject) | set(test["group"]))
    assert not set(train.subject) & set(test["group"])


def test_every_image_is_a_jpeg_of_the_configured_size(dataset, smoke_synthetic):
    raw, _, _ = dataset
    for path in (raw / "imgs").rglob("*.jpg"):
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert im.size == (smoke_synthetic.width, smoke_synthetic.height)


def test_hidden_labels_cover_exactly_the_test_images_outside_the_competition_folder(dataset):
    raw, hidden, _ = dataset
    labels = pd.read_csv(hidden / "test_labels.csv")
    assert list(labels.columns) == ["id", "label", "group"]  # the normalised hidden-label format
    assert set(labels["id"]) == set(pd.read_csv(raw / "sample_submission.csv").img)
    assert labels["id"].is_unique and set(labels["label"]) <= set(CLASSES)
    assert not hidden.resolve().is_relative_to(raw.resolve())
    assert not list(raw.rglob("test_labels.csv"))


def test_hidden_folder_inside_the_competition_folder_is_refused(tmp_path, smoke_synthetic):
    with pytest.raises(ValueError, match="outside the competition folder"):
        synthetic.generate(smoke_synthetic, tmp_path / "raw", tmp_path / "raw" / "hidden")


def test_same_seed_gives_identical_bytes_and_another_seed_differs(dataset, tmp_path, smoke_synthetic):
    raw, hidden, _ = dataset
    synthetic.generate(smoke_synthetic, tmp_path / "again", tmp_path / "again_hidden")
    assert file_digests(tmp_path / "again") == file_digests(raw)
    assert file_digests(tmp_path / "again_hidden") == file_digests(hidden)
    other = smoke_synthetic.model_copy(update={"seed": smoke_synthetic.seed + 1})
    synthetic.generate(other, tmp_path / "other", tmp_path / "other_hidden")
    assert file_digests(tmp_path / "other") != file_digests(raw)


def test_worker_processes_render_the_same_bytes(dataset, tmp_path, smoke_synthetic, monkeypatch):
    raw, _, _ = dataset
    monkeypatch.setattr(synthetic, "worker_count", lambda n_images, width: 2)
    synthetic.generate(smoke_synthetic, tmp_path / "parallel", tmp_path / "parallel_hidden")
    assert file_digests(tmp_path / "parallel") == file_digests(raw)


def small_grey_pixels(raw: Path, train: pd.DataFrame) -> np.ndarray:
    rows = []
    for classname, img in zip(train.classname, train.img, strict=True):
        with Image.open(raw / "imgs" / "train" / classname / img) as im:
            rows.append(np.asarray(im.convert("L").resize((16, 12), Image.BOX), dtype=np.float64).ravel())
    return np.stack(rows)


def test_frames_of_a_driver_are_near_duplicates(dataset):
    """Like the real data: an image's nearest neighbour is almost always the same driver, and
    images of one driver are much closer to each other than to other drivers' images."""
    raw, _, _ = dataset
    train = pd.read_csv(raw / "driver_imgs_list.csv")
    x = small_grey_pixels(raw, train)
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    same_driver = train.subject.to_numpy()[:, None] == train.subject.to_numpy()[None, :]
    off_diagonal = ~np.eye(len(x), dtype=bool)
    within = dist[same_driver & off_diagonal].mean()
    between = dist[~same_driver].mean()
    assert within < 0.6 * between
    np.fill_diagonal(dist, np.inf)
    nearest = dist.argmin(axis=1)
    assert np.mean(train.subject.to_numpy()[nearest] == train.subject.to_numpy()) >= 0.95


def test_left_classes_mirror_right_classes():
    poses = synthetic.CLASS_POSES
    assert poses["c3"] == poses["c1"].mirrored() and poses["c4"] == poses["c2"].mirrored()
    assert poses["c1"].mirrored().mirrored() == poses["c1"]
    # c0 and c9 share the hands; only the head turn differs.
    assert (poses["c0"].right, poses["c0"].left) == (poses["c9"].right, poses["c9"].left)
    assert poses["c0"].yaw != poses["c9"].yaw


def test_config_rejects_fewer_test_images_than_test_drivers():
    with pytest.raises(ValueError, match="n_test"):
        SyntheticConfig(n_test=2, n_test_drivers=3)


def test_main_writes_the_smoke_preset(tmp_path, capsys):
    assert synthetic.main([str(tmp_path / "raw"), str(tmp_path / "hidden"), "--preset", "smoke"]) == 0
    assert '"n_test": 40' in capsys.readouterr().out
    assert (tmp_path / "hidden" / "test_labels.csv").exists()
