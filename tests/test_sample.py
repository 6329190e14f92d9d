import os

import pandas as pd
import pytest

from pipeline.config import SplitConfig, load_profile
from pipeline.errors import StageError
from pipeline.io import atomic_write_csv
from pipeline.stages.sample import make_sample, run
from pipeline.stages.split import make_split
from pipeline.synthetic.drivers import CLASSES


def write_split_dataset(cfg, n_drivers=6, per_class=2):
    """A tiny raw folder (empty files stand in for JPEGs: sample only links them) plus its split."""
    raw = cfg.paths.path("raw")
    rows = [(f"img_{d}_{c}_{i}.jpg", f"p{d:03d}", c) for d in range(n_drivers) for c in CLASSES for i in range(per_class)]
    index = pd.DataFrame(rows, columns=["id", "group", "label"])
    index["path"] = "imgs/train/" + index["label"] + "/" + index["id"]
    for p in index["path"]:
        (raw / p).parent.mkdir(parents=True, exist_ok=True)
        (raw / p).write_bytes(p.encode())
    atomic_write_csv(raw / "train_index.csv", index)
    atomic_write_csv(cfg.paths.path("split_csv"), make_split(index, cfg.split))
    return index


def read_sample_and_split(cfg):
    sample = pd.read_csv(cfg.paths.path("sample") / "split.csv", dtype=str)
    split = pd.read_csv(cfg.paths.path("split_csv"), dtype=str)
    merged = sample.merge(split, on=["id", "group", "label"], suffixes=("", "_full"))
    assert len(merged) == len(sample)  # every sampled image is a row of the split
    return sample, split, merged


def test_sample_draws_each_split_from_its_own_drivers(tmp_path):
    cfg = load_profile("smoke", ["split.validation=holdout"]).at(tmp_path)
    write_split_dataset(cfg)
    figures = run(cfg)
    sample, split, merged = read_sample_and_split(cfg)
    assert (split["split"] == "valid").any()
    assert (merged["split"] == merged["split_full"]).all()
    assert not set(sample.loc[sample.split == "train", "group"]) & set(sample.loc[sample.split == "valid", "group"])
    assert figures["n_train"] == cfg.sample.n_train and figures["n_valid"] == cfg.sample.n_valid


def test_cv_sample_validates_on_fold_zero_drivers(smoke_cfg):
    assert smoke_cfg.split.validation == "cv"
    write_split_dataset(smoke_cfg)
    figures = run(smoke_cfg)
    sample, split, merged = read_sample_and_split(smoke_cfg)
    assert (split["split"] == "train").all()  # cv holds nothing out: the sample picks fold 0 itself
    fold0 = set(split.loc[split["fold"] == "0", "group"])
    others = set(split.loc[split["fold"] != "0", "group"])
    assert fold0 and others and not fold0 & others
    valid, train = merged[merged["split"] == "valid"], merged[merged["split"] == "train"]
    assert set(valid["group"]) <= fold0 and (valid["fold_full"] == "0").all()
    assert set(train["group"]) <= others and (train["fold_full"] != "0").all()
    assert (merged["fold"] == merged["fold_full"]).all()
    assert figures["n_train"] == smoke_cfg.sample.n_train and figures["n_valid"] == smoke_cfg.sample.n_valid
    assert figures["valid_groups"] == valid["group"].nunique() and figures["train_groups"] == train["group"].nunique()
    out = smoke_cfg.paths.path("sample")
    assert all((out / "valid" / row.label / row.id).exists() for row in valid.itertuples())


def test_sample_mirror_links_the_same_bytes(smoke_cfg):
    write_split_dataset(smoke_cfg)
    run(smoke_cfg)
    out = smoke_cfg.paths.path("sample")
    sample = pd.read_csv(out / "split.csv", dtype=str)
    for row in sample.itertuples():
        mirrored = out / row.path
        assert mirrored == out / row.split / row.label / row.id  # the Keras-style <split>/<class>/ mirror
        original = smoke_cfg.paths.path("raw") / "imgs" / "train" / row.label / row.id
        assert mirrored.read_bytes() == original.read_bytes()
        assert os.path.samefile(mirrored, original)  # hard link: no extra disk


def five_drivers():
    return pd.DataFrame([(f"i{d}{c}", f"p{d}", c) for d in range(5) for c in CLASSES], columns=["id", "group", "label"])


def test_sample_is_capped_by_the_split_and_deterministic():
    split = make_split(five_drivers(), SplitConfig(validation="holdout", valid_groups=1, n_folds=2))
    small = make_sample(split, 10_000, 10_000, seed=0)
    assert len(small) == len(split)
    assert (small.split == "valid").sum() == (split.split == "valid").sum() == len(CLASSES)  # one valid driver
    a, b = make_sample(split, 12, 5, seed=3), make_sample(split, 12, 5, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert (a.split == "train").sum() == 12 and (a.split == "valid").sum() == 5
    assert set(a.loc[a.split == "valid", "group"]) == set(split.loc[split.split == "valid", "group"])


def test_cv_sample_is_capped_by_fold_zero():
    split = make_split(five_drivers(), SplitConfig(n_folds=2))
    assert (split["split"] == "train").all()
    small = make_sample(split, 10_000, 10_000, seed=0)
    assert len(small) == len(split)
    assert (small.split == "valid").sum() == (split.fold == 0).sum()  # all of fold 0, nothing else
    assert (small.loc[small.split == "valid", "fold"] == 0).all()
    assert (small.loc[small.split == "train", "fold"] != 0).all()
    a, b = make_sample(split, 12, 5, seed=3), make_sample(split, 12, 5, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert (a.split == "train").sum() == 12 and (a.split == "valid").sum() == 5
    assert set(a.loc[a.split == "valid", "group"]) <= set(split.loc[split.fold == 0, "group"])


def test_sample_without_split_says_what_to_run(smoke_cfg):
    with pytest.raises(StageError, match="run the ingest and split stages first"):
        run(smoke_cfg)
