import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.competition import Competition, write_competition
from pipeline.competitions.statefarm import CLASSES
from pipeline.config import SplitConfig
from pipeline.errors import BadInputError, StageError
from pipeline.io import atomic_write_csv
from pipeline.stages.split import SPLIT_COLUMNS, make_split, run


@st.composite
def driver_tables(draw):
    """Arbitrary driver/class tables: 3-12 drivers, each with a random non-empty subset of classes
    and 1-4 images per (driver, class)."""
    n_drivers = draw(st.integers(3, 12))
    rows, n = [], 0
    for d in range(n_drivers):
        classes = draw(st.lists(st.sampled_from(CLASSES), min_size=1, max_size=10, unique=True))
        for c in classes:
            for _ in range(draw(st.integers(1, 4))):
                rows.append((f"img_{n}.jpg", f"p{d:03d}", c))
                n += 1
    return pd.DataFrame(rows, columns=["id", "group", "label"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=driver_tables(), n_valid=st.integers(1, 2), n_folds=st.integers(2, 3), seed=st.integers(0, 10))
def test_split_properties(table, n_valid, n_folds, seed):
    try:
        split = make_split(table, SplitConfig(valid_groups=n_valid, n_folds=n_folds, seed=seed))
    except StageError:
        return  # an impossible request (no driver subset covers every class) is refused, not mis-split
    assert list(split.columns) == SPLIT_COLUMNS
    assert sorted(split["id"]) == sorted(table["id"])  # every row exactly once
    train_drivers = set(split.loc[split["split"] == "train", "group"])
    valid_drivers = set(split.loc[split["split"] == "valid", "group"])
    assert not train_drivers & valid_drivers
    assert len(valid_drivers) == n_valid
    assert set(split.loc[split["split"] == "valid", "label"]) == set(table["label"])
    assert split["fold"].between(0, n_folds - 1).all()  # every row exactly one fold
    assert (split.groupby("group")["fold"].nunique() == 1).all()  # no driver spans two folds


def full_table(n_drivers=8, per_class=3):
    rows = [(f"img_{d}_{c}_{i}.jpg", f"p{d:03d}", c) for d in range(n_drivers) for c in CLASSES for i in range(per_class)]
    return pd.DataFrame(rows, columns=["id", "group", "label"])


def test_split_is_deterministic_by_seed():
    table = full_table()
    a = make_split(table, SplitConfig(valid_groups=2, n_folds=3, seed=1))
    b = make_split(table.sample(frac=1, random_state=0), SplitConfig(valid_groups=2, n_folds=3, seed=1))
    pd.testing.assert_frame_equal(a, b)
    others = [make_split(table, SplitConfig(valid_groups=2, n_folds=3, seed=s)) for s in range(2, 6)]
    assert any(not o.equals(a) for o in others)


def test_fraction_of_drivers():
    split = make_split(full_table(10), SplitConfig(valid_groups=0.2, n_folds=2))
    assert split.loc[split["split"] == "valid", "group"].nunique() == 2


def test_folds_are_class_stratified():
    split = make_split(full_table(12), SplitConfig(valid_groups=2, n_folds=3))
    per_fold = split.groupby("fold")["label"].nunique()
    assert (per_fold == 10).all()


@pytest.mark.parametrize("cfg, message", [
    (SplitConfig(valid_groups=8), "at least one group must stay in train"),
    (SplitConfig(valid_groups=2, n_folds=9), "n_folds=9 needs at least that many groups"),
])
def test_impossible_requests_are_refused(cfg, message):
    with pytest.raises(StageError, match=message):
        make_split(full_table(8), cfg)


def write_index(cfg, index, has_groups=True):
    atomic_write_csv(cfg.paths.path("raw") / "train_index.csv", index)
    write_competition(cfg.paths.path("raw"), Competition(CLASSES, "img", has_groups, "subject", "folder", "dir"))


def test_run_writes_split_csv_and_figures(smoke_cfg):
    index = full_table(6).assign(path=lambda t: "imgs/train/" + t["label"] + "/" + t["id"])
    write_index(smoke_cfg, index)
    figures = run(smoke_cfg)
    split = pd.read_csv(smoke_cfg.paths.path("split_csv"))
    assert len(split) == len(index) and figures["n_valid"] + figures["n_train"] == len(index)
    assert smoke_cfg.paths.stage_metrics_file("split").exists()


def test_unknown_class_in_index_names_file_and_row(smoke_cfg):
    index = full_table(4).assign(path="x")
    index.loc[5, "label"] = "c11"
    write_index(smoke_cfg, index)
    with pytest.raises(BadInputError, match=r"train_index.csv, row 7: label 'c11' is not a class"):
        run(smoke_cfg)
    assert not smoke_cfg.paths.path("split_csv").exists()


def test_without_groups_validation_and_folds_are_per_image_and_stratified():
    table = full_table(1, per_class=10)  # one "group": the group column is ignored without groups
    split = make_split(table, SplitConfig(valid_fraction=0.2, n_folds=5, seed=3), grouped=False)
    assert (split["group"] == split["id"]).all()  # every image its own group
    valid = split[split["split"] == "valid"]
    assert (valid.groupby("label").size() == 2).all() and set(valid["label"]) == set(CLASSES)
    assert (split.groupby(["fold", "label"]).size() == 2).all()  # StratifiedKFold: 10 per class over 5 folds
    again = make_split(table.sample(frac=1, random_state=1), SplitConfig(valid_fraction=0.2, n_folds=5, seed=3),
                       grouped=False)
    pd.testing.assert_frame_equal(split, again)


def test_run_without_groups_writes_a_per_image_split(smoke_cfg):
    index = full_table(1, per_class=6).assign(group="", path="x")
    write_index(smoke_cfg, index, has_groups=False)
    figures = run(smoke_cfg)
    split = pd.read_csv(smoke_cfg.paths.path("split_csv"), dtype=str)
    assert figures["grouped"] is False and (split["group"] == split["id"]).all()


def test_missing_index_says_which_stage_to_run(smoke_cfg):
    with pytest.raises(StageError, match="run the ingest stage first"):
        run(smoke_cfg)
