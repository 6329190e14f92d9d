"""The oof stage on constructed fold predictions: every labelled image exactly once with its fold, the
test set averaged over fold models (each fold's kept too, with the gain of averaging), a fold file that misses or adds a row refused, and a chain stage
that does worse than the one it starts from flagged."""

import numpy as np
import pandas as pd
import pytest

from pipeline.competition import Competition, write_competition
from pipeline.errors import StageError
from pipeline.io import atomic_write_csv
from pipeline.metrics import read_oof, read_predictions, write_predictions
from pipeline.stages import oof

CLASSES = ("cat", "dog", "fox")


def project(cfg, n_per_fold: int = 4, n_test: int = 5) -> tuple[pd.DataFrame, list[str]]:
    """split.csv (2 folds, interleaved rows), test_index.csv and competition.json under ``cfg``."""
    raw = cfg.paths.path("raw")
    write_competition(raw, Competition(CLASSES, "id", True, "subject", "folder", "synthetic"))
    n = 2 * n_per_fold
    split = pd.DataFrame({"id": [f"i{k}.jpg" for k in range(n)], "label": [CLASSES[k % 3] for k in range(n)],
                          "group": [f"g{k % 4}" for k in range(n)], "split": "train", "fold": [k % 2 for k in range(n)]})
    atomic_write_csv(cfg.paths.path("split_csv"), split)
    test_ids = [f"t{k}.jpg" for k in range(n_test)]
    atomic_write_csv(raw / "test_index.csv", pd.DataFrame({"id": test_ids, "path": [f"test/{i}" for i in test_ids]}))
    return split, test_ids


def fold_files(cfg, model: str, split: pd.DataFrame, test_ids: list[str], rng: np.random.Generator) -> dict[int, np.ndarray]:
    tests = {}
    for fold in (0, 1):
        held = split.loc[split["fold"] == fold, "id"].tolist()
        folder = cfg.paths.fold_predictions(model, fold)
        write_predictions(folder / "oof.csv", held[::-1], rng.dirichlet(np.ones(3), len(held)), CLASSES)  # any order
        tests[fold] = rng.dirichlet(np.ones(3), len(test_ids))
        write_predictions(folder / "test.csv", test_ids, tests[fold], CLASSES)
    return tests


@pytest.fixture
def gathered_cfg(smoke_cfg):
    cfg = smoke_cfg.model_copy(update={"ensemble": smoke_cfg.ensemble.model_copy(update={"include": ["head"], "members": []})})
    split, test_ids = project(cfg)
    tests = fold_files(cfg, "head", split, test_ids, np.random.default_rng(0))
    return cfg, split, test_ids, tests


def test_every_labelled_image_once_with_its_fold_and_the_test_mean(gathered_cfg):
    cfg, split, test_ids, tests = gathered_cfg
    figures = oof.run(cfg)
    ids, folds, probs = read_oof(cfg.paths.oof_predictions("head") / "oof.csv")
    assert ids == split["id"].tolist() and folds.tolist() == split["fold"].tolist()  # split.csv order
    _, fold0 = read_predictions(cfg.paths.fold_predictions("head", 0) / "oof.csv")
    np.testing.assert_allclose(probs[split["fold"].to_numpy() == 0][::-1], fold0, atol=1e-5)
    got_ids, test = read_predictions(cfg.paths.oof_predictions("head") / "test.csv")
    assert got_ids == test_ids
    np.testing.assert_allclose(test, (tests[0] + tests[1]) / 2, atol=1e-5)
    head = figures["models"]["head"]
    assert [head["folds"][f]["n"] for f in ("0", "1")] == [4, 4] and figures["n_oof"] == 8
    assert head["fold_logloss_mean"] == pytest.approx(np.mean([head["folds"][f]["logloss"] for f in ("0", "1")]))


def test_each_fold_models_test_predictions_are_kept_with_the_gain_of_averaging_them(gathered_cfg):
    from pipeline.outoffold import fold_averaging_gain, read_test_folds

    cfg, _, test_ids, tests = gathered_cfg
    figures = oof.run(cfg)
    folder = cfg.paths.oof_predictions("head")
    per_fold = read_test_folds(folder / "test_folds.csv", test_ids, CLASSES, "oof")
    np.testing.assert_allclose(per_fold, np.stack([tests[0], tests[1]]), atol=1e-5)
    _, mean = read_predictions(folder / "test.csv")
    gain = figures["models"]["head"]["fold_averaging_gain"]
    assert gain == pytest.approx(fold_averaging_gain(mean, per_fold), abs=1e-6) and gain > 0


@pytest.mark.parametrize("change", ["drop", "add"])
def test_a_fold_file_that_misses_or_adds_a_row_is_refused(gathered_cfg, change):
    cfg, split, _, _ = gathered_cfg
    path = cfg.paths.fold_predictions("head", 1) / "oof.csv"
    frame = pd.read_csv(path)
    if change == "drop":
        frame = frame.iloc[1:]
    else:  # a fold-0 image predicted by fold 1's model: it would be scored by a model that trained on it
        frame = pd.concat([frame, frame.iloc[[0]].assign(id=split.loc[split["fold"] == 0, "id"].iloc[0])])
    frame.to_csv(path, index=False)
    with pytest.raises(StageError, match=r"folds/head/1/oof.csv: .*rerun head@1"):
        oof.run(cfg)
    assert not cfg.paths.oof_predictions("head").exists()  # nothing half-written


def test_a_stage_worse_than_the_one_it_starts_from_is_flagged(capsys):
    models = {"head": {"valid_logloss": 0.5}, "finetune": {"valid_logloss": 0.6}, "pseudo": {"valid_logloss": 0.55},
              "member0": {"valid_logloss": 0.9}}
    oof.flag_regressions(models)
    assert models["finetune"]["worse_than_predecessor"] is True and models["finetune"]["predecessor"] == "head"
    assert models["pseudo"]["worse_than_predecessor"] is False and models["pseudo"]["predecessor"] == "finetune"
    assert "predecessor" not in models["head"] and "predecessor" not in models["member0"]
    assert "finetune is worse out of fold than head" in capsys.readouterr().err
