import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.competition import Competition, write_competition
from pipeline.config import SplitConfig, load_profile
from pipeline.errors import BadInputError, StageError
from pipeline.io import atomic_write_csv
from pipeline.stages.split import SPLIT_COLUMNS, make_split, run
from pipeline.synthetic.drivers import CLASSES


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


def enough_for_folds(table, n_folds) -> bool:
    """Some class has at least n_folds images; otherwise the split is refused (see
    test_too_few_images_per_class_is_a_stage_error)."""
    return int(table["label"].value_counts().max()) >= n_folds


def holdout(**kwargs) -> SplitConfig:
    return SplitConfig(validation="holdout", **kwargs)


def test_cv_is_the_default():
    assert SplitConfig().validation == "cv"
    assert load_profile("smoke").split.validation == "cv"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=driver_tables(), n_valid=st.integers(1, 2), n_folds=st.integers(2, 3), seed=st.integers(0, 10))
def test_split_properties(table, n_valid, n_folds, seed):
    assume(enough_for_folds(table, n_folds))
    try:
        split = make_split(table, holdout(valid_groups=n_valid, n_folds=n_folds, seed=seed))
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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=driver_tables(), n_folds=st.integers(2, 3), seed=st.integers(0, 10))
def test_cv_split_properties(table, n_folds, seed):
    assume(enough_for_folds(table, n_folds))
    split = make_split(table, SplitConfig(n_folds=n_folds, seed=seed))  # >= 3 drivers: never refused
    assert list(split.columns) == SPLIT_COLUMNS
    assert sorted(split["id"]) == sorted(table["id"])  # every labelled row exactly once ...
    assert split["fold"].between(0, n_folds - 1).all()  # ... in exactly one fold
    assert set(split["fold"]) == set(range(n_folds))  # every fold holds some rows out
    assert (split["split"] == "train").all()  # nothing held out for good
    assert (split.groupby("group")["fold"].nunique() == 1).all()  # no driver spans two folds
    merged = split.merge(table, on="id", suffixes=("", "_in"))
    assert (merged["group"] == merged["group_in"]).all() and (merged["label"] == merged["label_in"]).all()


def full_table(n_drivers=8, per_class=3):
    rows = [(f"img_{d}_{c}_{i}.jpg", f"p{d:03d}", c) for d in range(n_drivers) for c in CLASSES for i in range(per_class)]
    return pd.DataFrame(rows, columns=["id", "group", "label"])


@pytest.mark.parametrize("validation", ["cv", "holdout"])
def test_split_is_deterministic_by_seed(validation):
    table = full_table()
    a = make_split(table, SplitConfig(validation=validation, valid_groups=2, n_folds=3, seed=1))
    b = make_split(table.sample(frac=1, random_state=0),
                   SplitConfig(validation=validation, valid_groups=2, n_folds=3, seed=1))
    pd.testing.assert_frame_equal(a, b)
    others = [make_split(table, SplitConfig(validation=validation, valid_groups=2, n_folds=3, seed=s))
              for s in range(2, 6)]
    assert any(not o.equals(a) for o in others)


def test_fraction_of_drivers():
    split = make_split(full_table(10), holdout(valid_groups=0.2, n_folds=2))
    assert split.loc[split["split"] == "valid", "group"].nunique() == 2


@pytest.mark.parametrize("validation", ["cv", "holdout"])
def test_folds_are_class_stratified(validation):
    split = make_split(full_table(12), SplitConfig(validation=validation, valid_groups=2, n_folds=3))
    per_fold = split.groupby("fold")["label"].nunique()
    assert sorted(per_fold.index) == [0, 1, 2] and (per_fold == 10).all()
    # 12 identical drivers over 3 folds: stratified and grouped, every fold gets 4 of them.
    assert (split.groupby("fold")["group"].nunique() == 4).all()


def test_cv_holds_every_driver_out_exactly_once():
    table = full_table(10)
    split = make_split(table, SplitConfig(n_folds=5, seed=2))
    assert (split["split"] == "train").all()
    assert split.groupby("group")["fold"].nunique().eq(1).all()
    assert split.groupby("fold")["group"].nunique().sum() == 10  # each driver held out by one fold
    assert sorted(split["fold"].unique()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("cfg, message", [
    (holdout(valid_groups=8), "at least one group must stay in train"),
    (holdout(valid_groups=2, n_folds=9), "n_folds=9 needs at least that many groups"),
    (SplitConfig(n_folds=9), "n_folds=9 needs at least that many groups"),
])
def test_impossible_requests_are_refused(cfg, message):
    with pytest.raises(StageError, match=message):
        make_split(full_table(8), cfg)


@pytest.mark.parametrize("validation", ["cv", "holdout"])
def test_too_few_images_per_class_is_a_stage_error(validation):
    table = pd.DataFrame([("a", "p0", "c0"), ("b", "p1", "c0"), ("c", "p2", "c1")], columns=["id", "group", "label"])
    with pytest.raises(StageError, match="n_folds=3"):
        make_split(table, SplitConfig(validation=validation, valid_groups=2, n_folds=3))


def test_holdout_only_options_do_not_refuse_cv():
    # valid_groups=8 of 8 drivers is refused in holdout (above); cv holds no validation groups out.
    split = make_split(full_table(8), SplitConfig(valid_groups=8, n_folds=4))
    assert (split["split"] == "train").all() and set(split["fold"]) == {0, 1, 2, 3}


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
    # smoke is cv: every row trains some fold models, the folds partition the rows.
    assert figures["validation"] == "cv"
    assert figures["n_valid"] == 0 and figures["valid_groups"] == [] and figures["n_groups"] == 6
    assert (split["split"] == "train").all()
    assert len(figures["fold_sizes"]) == smoke_cfg.split.n_folds and sum(figures["fold_sizes"]) == len(index)
    assert figures["fold_sizes"] == split["fold"].value_counts().sort_index().tolist()
    assert pd.read_json(smoke_cfg.paths.stage_metrics_file("split"), typ="series")["validation"] == "cv"


def test_run_holdout_writes_its_validation_drivers(tmp_path):
    cfg = load_profile("smoke", ["split.validation=holdout"]).at(tmp_path)
    index = full_table(6).assign(path=lambda t: "imgs/train/" + t["label"] + "/" + t["id"])
    write_index(cfg, index)
    figures = run(cfg)
    split = pd.read_csv(cfg.paths.path("split_csv"))
    valid = split[split["split"] == "valid"]
    assert figures["validation"] == "holdout"
    assert figures["n_valid"] == len(valid) > 0 and figures["n_train"] + figures["n_valid"] == len(index)
    assert figures["valid_groups"] == sorted(valid["group"].unique()) and len(figures["valid_groups"]) == cfg.split.valid_groups
    assert sum(figures["fold_sizes"]) == len(index)  # folds are assigned in holdout too


def test_unknown_class_in_index_names_file_and_row(smoke_cfg):
    index = full_table(4).assign(path="x")
    index.loc[5, "label"] = "c11"
    write_index(smoke_cfg, index)
    with pytest.raises(BadInputError, match=r"train_index.csv, row 7: label 'c11' is not a class"):
        run(smoke_cfg)
    assert not smoke_cfg.paths.path("split_csv").exists()


@pytest.mark.parametrize("validation", ["cv", "holdout"])
def test_without_groups_validation_and_folds_are_per_image_and_stratified(validation):
    table = full_table(1, per_class=10)  # one "group": the group column is ignored without groups
    cfg = SplitConfig(validation=validation, valid_fraction=0.2, n_folds=5, seed=3)
    split = make_split(table, cfg, grouped=False)
    assert (split["group"] == split["id"]).all()  # every image its own group
    valid = split[split["split"] == "valid"]
    if validation == "holdout":
        assert (valid.groupby("label").size() == 2).all() and set(valid["label"]) == set(CLASSES)
    else:
        assert valid.empty and (split["split"] == "train").all()
    assert len(split.groupby(["fold", "label"])) == 5 * len(CLASSES)  # every class in every fold ...
    assert (split.groupby(["fold", "label"]).size() == 2).all()  # ... StratifiedKFold: 10 per class over 5 folds
    again = make_split(table.sample(frac=1, random_state=1), cfg, grouped=False)
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
