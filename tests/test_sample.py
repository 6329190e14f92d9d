import os

import pandas as pd
import pytest

from pipeline.config import CLASSES, SplitConfig
from pipeline.errors import StageError
from pipeline.io import atomic_write_csv
from pipeline.stages.sample import make_sample, run
from pipeline.stages.split import make_split


def write_split_dataset(cfg, n_drivers=6, per_class=2):
    """A tiny raw folder (empty files stand in for JPEGs: sample only links them) plus its split."""
    raw = cfg.paths.path("raw")
    rows = [(f"img_{d}_{c}_{i}.jpg", f"p{d:03d}", c) for d in range(n_drivers) for c in CLASSES for i in range(per_class)]
    index = pd.DataFrame(rows, columns=["img", "subject", "classname"])
    index["path"] = "imgs/train/" + index["classname"] + "/" + index["img"]
    for p in index["path"]:
        (raw / p).parent.mkdir(parents=True, exist_ok=True)
        (raw / p).write_bytes(p.encode())
    atomic_write_csv(raw / "train_index.csv", index)
    atomic_write_csv(cfg.paths.path("split_csv"), make_split(index, SplitConfig(valid_drivers=2, n_folds=2)))
    return index


def test_sample_draws_each_split_from_its_own_drivers(smoke_cfg):
    write_split_dataset(smoke_cfg)
    figures = run(smoke_cfg)
    sample = pd.read_csv(smoke_cfg.paths.path("sample") / "split.csv")
    split = pd.read_csv(smoke_cfg.paths.path("split_csv"))
    merged = sample.merge(split, on=["img", "subject", "classname"], suffixes=("", "_full"))
    assert len(merged) == len(sample) and (merged["split"] == merged["split_full"]).all()
    assert not set(sample.loc[sample.split == "train", "subject"]) & set(sample.loc[sample.split == "valid", "subject"])
    assert figures["n_train"] == smoke_cfg.sample.n_train and figures["n_valid"] == smoke_cfg.sample.n_valid


def test_sample_mirror_links_the_same_bytes(smoke_cfg):
    write_split_dataset(smoke_cfg)
    run(smoke_cfg)
    out = smoke_cfg.paths.path("sample")
    sample = pd.read_csv(out / "split.csv")
    for row in sample.itertuples():
        mirrored = out / row.split / row.classname / row.img
        original = smoke_cfg.paths.path("raw") / "imgs" / "train" / row.classname / row.img
        assert mirrored.read_bytes() == original.read_bytes()
        assert os.path.samefile(mirrored, original)  # hard link: no extra disk


def test_sample_is_capped_by_the_split_and_deterministic():
    split = make_split(pd.DataFrame([(f"i{d}{c}", f"p{d}", c) for d in range(5) for c in CLASSES],
                                    columns=["img", "subject", "classname"]), SplitConfig(valid_drivers=1, n_folds=2))
    small = make_sample(split, 10_000, 10_000, seed=0)
    assert len(small) == len(split)
    a, b = make_sample(split, 12, 5, seed=3), make_sample(split, 12, 5, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert (a.split == "train").sum() == 12 and (a.split == "valid").sum() == 5


def test_sample_without_split_says_what_to_run(smoke_cfg):
    with pytest.raises(StageError, match="run the ingest and split stages first"):
        run(smoke_cfg)
