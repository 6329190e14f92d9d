"""The features stage: cache layout, fp16, index consistency, determinism, resume, stale and corrupt chunks,
failed runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import with_validation
from PIL import Image, ImageDraw

from pipeline.competition import Competition, write_competition
from pipeline.config import Config
from pipeline.convfeatures import cache as featurecache
from pipeline.data import ImageRowsDataset
from pipeline.errors import StageError
from pipeline.io import atomic_write_csv
from pipeline.models import create_backbone, create_conv_base, input_hw, resolve_preprocessing
from pipeline.stages import features
from pipeline.synthetic.drivers import CLASSES

# Class colours and positions of the "hand" blob: easy enough that random conv features separate them.
CLASS_COLOURS = [(230, 40, 40), (40, 230, 40), (40, 40, 230), (230, 230, 40), (230, 40, 230),
                 (40, 230, 230), (250, 150, 30), (120, 60, 20), (250, 250, 250), (10, 10, 10)]


def draw_frame(classname: str, driver: int, frame: int, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A State-Farm-like toy frame: a driver-specific background and an asymmetric class blob."""
    w, h = size
    c = int(classname[1:])
    bg = tuple(int(v) for v in 60 + (np.array([37, 71, 113]) * (driver + 1)) % 120)
    image = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, w // 6, h], fill=(20, 20, 20))  # the car pillar on the left: not symmetric
    x0 = int((c % 5) * w / 5 + rng.integers(0, 3))
    y0 = int((c // 5) * h / 2 + rng.integers(0, 3))
    draw.rectangle([x0, y0, x0 + w // 5 - 2, y0 + h // 2 - 2], fill=CLASS_COLOURS[c])
    noise = rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def write_tiny_dataset(cfg: Config, n_drivers: int = 6, n_valid_drivers: int = 2, per_class: int = 2,
                       n_test_drivers: int = 2, size: tuple[int, int] = (64, 48), seed: int = 0) -> dict[str, pd.DataFrame]:
    """Kaggle layout + train_index.csv/test_index.csv in data/raw, data/split.csv and hidden test
    labels, exactly as the ingest and split stages leave them (the input contract): in holdout mode
    the last ``n_valid_drivers`` drivers are the validation split, in cv mode nothing is; folds are
    driver number mod 2 either way."""
    raw, hidden = cfg.paths.path("raw"), cfg.paths.path("hidden")
    rng = np.random.default_rng(seed)
    train_rows, test_rows, n = [], [], 0
    for d in range(n_drivers + n_test_drivers):
        for c in CLASSES:
            for f in range(per_class if d < n_drivers else 1):
                n += 1
                img = f"img_{n}.jpg"
                rel = f"imgs/train/{c}/{img}" if d < n_drivers else f"imgs/test/{img}"
                (raw / rel).parent.mkdir(parents=True, exist_ok=True)
                draw_frame(c, d, f, size, rng).save(raw / rel, quality=90)
                (train_rows if d < n_drivers else test_rows).append((img, f"p{d:03d}", c, rel))
    train = pd.DataFrame(train_rows, columns=["id", "group", "label", "path"])
    test = pd.DataFrame(test_rows, columns=["id", "group", "label", "path"])
    atomic_write_csv(raw / "train_index.csv", train[["id", "path", "label", "group"]])
    atomic_write_csv(raw / "test_index.csv", test[["id", "path"]])
    write_competition(raw, Competition(CLASSES, "id", True, "subject", "folder", "synthetic"))
    valid_subjects = sorted(train["group"].unique())[-n_valid_drivers:]
    split = train[["id", "label", "group"]].copy()
    holdout = cfg.split.validation == "holdout"
    split["split"] = np.where(split["group"].isin(valid_subjects) & holdout, "valid", "train")
    split["fold"] = split["group"].str[1:].astype(int) % 2
    atomic_write_csv(cfg.paths.path("split_csv"), split)
    hidden.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(hidden / "test_labels.csv", test[["id", "label", "group"]])
    return {"train": train, "test": test, "split": split}


@pytest.fixture
def tiny_cfg(smoke_cfg: Config) -> Config:
    """The smoke profile over a tiny toy dataset (holdout: a validation split to cache without copies),
    with small chunks so resume has chunks to skip."""
    cfg = with_validation(smoke_cfg, "holdout")
    cfg = cfg.model_copy(update={"features": cfg.features.model_copy(update={"chunk_size": 16, "batch_size": 8, "copies": 3})})
    write_tiny_dataset(cfg)
    return cfg


def with_section(cfg: Config, section: str, **values) -> Config:
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})


def cached(cfg: Config) -> dict[str, featurecache.FeatureSplit]:
    return {s: featurecache.load_split(cfg.paths.path("features"), s) for s in features.SPLITS}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (meta.json, fingerprints, indexes, checksum records, chunks) by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_loading_one_copy_holds_only_its_rows_and_reads_only_their_chunks(tiny_cfg):
    features.run(tiny_cfg)
    out = tiny_cfg.paths.path("features")
    whole = featurecache.load_split(out, "train")
    plain = featurecache.load_split(out, "train", copy=0)
    expected = whole.subset(whole.index["id"], plain_only=True)
    assert plain.copies == 1 and (plain.index["copy"] == 0).all()
    assert (plain.index["row"] == np.arange(len(plain.index))).all()
    assert plain.index["id"].tolist() == expected.index["id"].tolist()
    assert np.array_equal(plain.features, expected.features)
    last = max(out.glob("train/chunk_*.npy"))  # copy-major: the last chunk holds augmented copies only
    last.write_bytes(b"corrupt")
    assert np.array_equal(featurecache.load_split(out, "train", copy=0).features, expected.features)
    with pytest.raises(StageError, match="malformed chunk"):
        featurecache.load_split(out, "train")


def test_cache_layout_shapes_dtype_and_index(tiny_cfg):
    figures = features.run(tiny_cfg)
    out = tiny_cfg.paths.path("features")
    meta = featurecache.load_meta(out)
    split = pd.read_csv(tiny_cfg.paths.path("split_csv"), dtype={"id": str, "label": str, "group": str})
    n_train, n_valid = (split["split"] == "train").sum(), (split["split"] == "valid").sum()
    dim = meta["channels"] * meta["grid"] ** 2
    assert meta["feature_dim"] == dim == figures["feature_dim"]
    assert meta["bytes_per_image"] == figures["bytes_per_image"] == dim * 2
    assert meta["channels"] == 512 // tiny_cfg.model.width_divisor

    cache = cached(tiny_cfg)
    assert cache["train"].features.shape == (n_train * 3, dim)
    assert cache["valid"].features.shape == (n_valid, dim)
    assert cache["test"].features.shape == (20, dim)
    for name, part in cache.items():
        assert part.features.dtype == np.float16 and np.isfinite(part.features).all()
        index = part.index
        assert (index["row"] == np.arange(len(index))).all()
        assert (index["chunk"] == index["row"] // 16).all() and (index["offset"] == index["row"] % 16).all()
        n_chunks = meta["splits"][name]["n_chunks"]
        assert sorted(p.name for p in (out / name).glob("chunk_*.npy")) == [f"chunk_{j:05d}.npy" for j in range(n_chunks)]
        for j in range(n_chunks):  # every chunk file holds exactly its index rows
            chunk = np.load(out / name / f"chunk_{j:05d}.npy")
            assert np.array_equal(chunk, part.features[index["chunk"] == j])

    train = cache["train"].index
    expected = split.loc[split["split"] == "train", "id"].tolist()
    for k in range(3):  # copy-major: all images as copy 0, then copy 1, ...
        assert train.loc[train["copy"] == k, "id"].tolist() == expected
    assert set(cache["valid"].index["copy"]) == {0} and set(cache["test"].index["copy"]) == {0}
    assert cache["valid"].index["id"].tolist() == split.loc[split["split"] == "valid", "id"].tolist()
    labels = dict(zip(split["id"], split["label"], strict=True))
    assert all(labels[i] == c for i, c in zip(train["id"], train["label"], strict=True))
    assert meta["classes"] == list(CLASSES)
    assert figures["n_train_rows"] == n_train * 3 and figures["chunks_reused"] == 0
    assert (tiny_cfg.paths.stage_metrics_file("features")).exists()


def test_augmented_copies_differ_and_copy_zero_is_plain(tiny_cfg):
    features.run(tiny_cfg)
    train = cached(tiny_cfg)["train"]
    f = train.features.astype(np.float32)
    c0, c1, c2 = (f[train.rows_of_copy(k)] for k in range(3))
    assert np.abs(c1 - c2).mean() > 1e-3 and np.abs(c0 - c1).mean() > 1e-3
    assert not np.any(np.all(c1 == c2, axis=1))  # every image's two augmented copies differ

    # Copy 0 is the plain image: the conv base on the unaugmented decode gives the same numbers.
    paths = features.read_image_tables(tiny_cfg)["train"]["path"].tolist()
    backbone = create_backbone(tiny_cfg.model)
    data_cfg = resolve_preprocessing(backbone, tiny_cfg.model)
    plain = ImageRowsDataset(paths, input_hw(data_cfg))
    with torch.no_grad():
        direct = create_conv_base(backbone, data_cfg, tiny_cfg.features.grid)(torch.stack([plain[i][0] for i in range(len(plain))]))
    np.testing.assert_allclose(c0, direct.numpy(), rtol=2e-3, atol=2e-3)


def test_resume_after_kill_skips_finished_chunks_and_matches_a_clean_run(tiny_cfg, tmp_path):
    out = tiny_cfg.paths.path("features")

    class Killed(Exception):
        pass

    written: list[tuple[str, int]] = []

    def kill_mid_train(split: str, chunk: int) -> None:
        written.append((split, chunk))
        if len(written) == 7:  # valid (3 chunks) and test (2) done, train cut after 2 of 15
            raise Killed

    with pytest.raises(Killed):
        features.run(tiny_cfg, on_chunk_written=kill_mid_train)
    assert not (out / featurecache.META_FILE).exists()
    with pytest.raises(StageError, match="no complete feature cache"):
        featurecache.load_split(out, "valid")
    finished = {(s, j): (out / s / f"chunk_{j:05d}.npy").stat().st_mtime_ns for s, j in written}

    recomputed: list[tuple[str, int]] = []
    figures = features.run(tiny_cfg, on_chunk_written=lambda s, j: recomputed.append((s, j)))
    assert not set(recomputed) & set(finished)
    assert figures["chunks_reused"] == 7 and figures["chunks_computed"] == len(recomputed)
    for (s, j), mtime in finished.items():
        assert (out / s / f"chunk_{j:05d}.npy").stat().st_mtime_ns == mtime

    clean_cfg = tiny_cfg.at(tmp_path / "clean")
    clean_cfg.paths.path("raw").parent.mkdir(parents=True)
    clean_cfg.paths.path("raw").symlink_to(tiny_cfg.paths.path("raw").resolve(), target_is_directory=True)
    clean_cfg.paths.path("split_csv").write_bytes(tiny_cfg.paths.path("split_csv").read_bytes())
    features.run(clean_cfg)
    resumed, clean = cached(tiny_cfg), cached(clean_cfg)
    for name in features.SPLITS:  # same seed, same result, however the run was cut
        assert np.array_equal(resumed[name].features, clean[name].features)
        pd.testing.assert_frame_equal(resumed[name].index, clean[name].index)
    assert folder_bytes(out) == folder_bytes(clean_cfg.paths.path("features"))  # every file, byte for byte


def test_a_complete_cache_is_reused_and_a_changed_config_is_not(tiny_cfg):
    features.run(tiny_cfg)
    again = features.run(tiny_cfg)
    assert again["chunks_computed"] == 0
    before = cached(tiny_cfg)

    # Augmentation only changes the train copies: valid/test chunks are kept, train recomputed.
    changed = with_section(tiny_cfg, "augment", rotate_deg=25.0)
    recomputed: list[str] = []
    features.run(changed, on_chunk_written=lambda s, j: recomputed.append(s))
    assert set(recomputed) == {"train"}
    after = cached(changed)
    assert np.array_equal(before["valid"].features, after["valid"].features)
    assert not np.array_equal(before["train"].features, after["train"].features)

    # A different grid changes every split; no old chunk (other shape) survives.
    regrid = with_section(changed, "features", grid=1)
    figures = features.run(regrid)
    assert figures["chunks_reused"] == 0
    assert cached(regrid)["test"].features.shape[1] == featurecache.load_meta(regrid.paths.path("features"))["channels"]


def test_partial_cache_is_never_read_as_complete(tiny_cfg):
    features.run(tiny_cfg)
    out = tiny_cfg.paths.path("features")
    (out / "train" / "chunk_00001.npy").unlink()
    with pytest.raises(StageError, match="chunk"):
        featurecache.load_split(out, "train")
    (out / "valid" / featurecache.FINGERPRINT_FILE).write_text("something else\n")
    with pytest.raises(StageError, match="fingerprint"):
        featurecache.load_split(out, "valid")
    # A rerun repairs exactly what is missing or stale.
    figures = features.run(tiny_cfg)
    assert figures["chunks_computed"] == 1 + featurecache.load_meta(out)["splits"]["valid"]["n_chunks"]
    featurecache.load_split(out, "train")


def test_missing_inputs_say_what_to_run(smoke_cfg):
    with pytest.raises(StageError, match="split"):
        features.run(smoke_cfg)


def test_use_sample_caches_the_sample_mirror(tiny_cfg):
    from pipeline.stages import sample

    cfg = with_section(with_section(tiny_cfg, "sample", n_train=20, n_valid=10), "features", use_sample=True, copies=2)
    sample.run(cfg)
    features.run(cfg)
    drawn = pd.read_csv(cfg.paths.path("sample") / "split.csv", dtype=str)
    cache = cached(cfg)
    assert cache["train"].index.loc[cache["train"].index["copy"] == 0, "id"].tolist() == drawn.loc[drawn["split"] == "train", "id"].tolist()
    assert len(cache["valid"].index) == 10 and len(cache["test"].index) == 20  # test is always the whole test set


def test_a_corrupt_chunk_is_refused_naming_the_file(tiny_cfg):
    """A NaN in a chunk, or bytes changed behind an intact header, would turn into NaN predictions
    downstream with exit 0: the cache's per-chunk checksum and a finiteness check refuse it."""
    features.run(tiny_cfg)
    out = tiny_cfg.paths.path("features")
    path = out / "valid" / "chunk_00000.npy"
    original = path.read_bytes()
    chunk = np.load(path)
    chunk[1, 2] = np.nan
    np.save(path, chunk)
    with pytest.raises(StageError, match=r"valid/chunk_00000.npy: checksum differs"):
        featurecache.load_split(out, "valid")
    meta = featurecache.load_meta(out)
    meta["splits"]["valid"]["chunk_sha256"][0] = None  # an older cache without checksums: the NaN still fails
    (out / "meta.json").write_text(__import__("json").dumps(meta))
    with pytest.raises(StageError, match=r"chunk_00000.npy: non-finite feature value in row 1"):
        featurecache.load_split(out, "valid")
    path.write_bytes(original)
    featurecache.load_split(out, "valid")


def test_a_chunk_changed_behind_an_intact_header_is_recomputed_not_adopted(tiny_cfg, capsys):
    """A chunk whose bytes differ from those the stage wrote (same shape and dtype, other values) is
    recomputed, never adopted into meta.json: the rerun leaves the uninterrupted run's cache."""
    features.run(tiny_cfg)
    out = tiny_cfg.paths.path("features")
    uninterrupted = folder_bytes(out)
    path = out / "train" / "chunk_00001.npy"
    chunk = np.load(path)
    np.save(path, np.ones_like(chunk))
    assert featurecache.chunk_is_valid(path, *chunk.shape) and path.read_bytes() != uninterrupted["train/chunk_00001.npy"]

    capsys.readouterr()
    recomputed: list[tuple[str, int]] = []
    figures = features.run(tiny_cfg, on_chunk_written=lambda s, j: recomputed.append((s, j)))
    assert recomputed == [("train", 1)]
    assert figures["chunks_corrupt"] == 1 and figures["chunks_computed"] == 1
    assert "[features] train: 1 chunk file(s) differ from the checksums recorded" in capsys.readouterr().err
    assert folder_bytes(out) == uninterrupted
    featurecache.load_split(out, "train")  # what the head reads


def test_a_run_on_an_unavailable_device_fails_before_touching_the_cache(tiny_cfg, monkeypatch):
    features.run(tiny_cfg)
    out = tiny_cfg.paths.path("features")
    before, loaded = folder_bytes(out), cached(tiny_cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(StageError, match="features.device is cuda"):
        features.run(with_section(tiny_cfg, "features", device="cuda"))
    assert folder_bytes(out) == before
    for name, part in cached(tiny_cfg).items():
        assert np.array_equal(part.features, loaded[name].features)


def test_a_run_that_fails_midway_keeps_meta_json_and_the_splits_it_did_not_change(tiny_cfg):
    """Until a new cache is complete the previous meta.json stays: splits the failed run left alone still
    load, and a split it had started rebuilding is refused by its fingerprint, never read as the old one."""
    features.run(tiny_cfg)
    before = cached(tiny_cfg)

    class Killed(Exception):
        pass

    def kill_in_train(split: str, chunk: int) -> None:
        if split == "train":
            raise Killed

    with pytest.raises(Killed):  # augmentation changes the train copies only
        features.run(with_section(tiny_cfg, "augment", rotate_deg=25.0), on_chunk_written=kill_in_train)
    out = tiny_cfg.paths.path("features")
    for name in ("valid", "test"):
        assert np.array_equal(featurecache.load_split(out, name).features, before[name].features)
    with pytest.raises(StageError, match="fingerprint"):
        featurecache.load_split(out, "train")
