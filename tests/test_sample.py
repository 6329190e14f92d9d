import os

import pandas as pd
import pytest

from pipeline.competitions.statefarm import CLASSES
from pipeline.config import SplitConfig
from pipeline.errors import StageError
from pipeline.io import atomic_write_csv
from pipeline.stages.sample import make_sample, run
from pipeline.stages.split import make_split


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
    atomic_write_csv(cfg.paths.path("split_csv"), make_split(index, SplitConfig(valid_groups=2, n_folds=2)))
    return index


def test_sample_draws_each_split_from_its_own_drivers(smoke_cfg):
    write_split_dataset(smoke_cfg)
    figures = run(smoke_cfg)
    sample = pd.read_csv(smoke_cfg.paths.path("sample") / "split.csv", dtype=str)
    split = pd.read_csv(smoke_cfg.paths.path("split_csv"), dtype=str)
    merged = sample.merge(split, on=["id", "group", "label"], suffixes=("", "_full"))
    assert len(merged) == len(sample) and (merged["split"] == merged["split_full"]).all()
    assert not set(sample.loc[sample.split == "train", "group"]) & set(sample.loc[sample.split == "valid", "group"])
    assert figures["n_train"] == smoke_cfg.sample.n_train and figures["n_valid"] == smoke_cfg.sample.n_valid


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


def test_sample_is_capped_by_the_split_and_deterministic():
    split = make_split(pd.DataFrame([(f"i{d}{c}", f"p{d}", c) for d in range(5) for c in CLASSES],
                                    columns=["id", "group", "label"]), SplitConfig(valid_groups=1, n_folds=2))
    small = make_sample(split, 10_000, 10_000, seed=0)
    assert len(small) == len(split)
    a, b = make_sample(split, 12, 5, seed=3), make_sample(split, 12, 5, seed=3)
    pd.testing.assert_frame_equal(a, b)
    assert (a.split == "train").sum() == 12 and (a.split == "valid").sum() == 5


def test_sample_without_split_says_what_to_run(smoke_cfg):
    with pytest.raises(StageError, match="run the ingest and split stages first"):
        run(smoke_cfg)
