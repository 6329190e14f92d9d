"""Member stage pieces on constructed inputs: the train rows a member keeps and the TTA decision
(``pipeline.training.prediction.tta_predictions``, which every fine-tuned CNN of the chain predicts with).
(The members trained end to end are in tests/test_ensemble.py.)"""

import numpy as np
import pandas as pd
import pytest

from pipeline.training.members import bagged_fold, kept_train_ids, member_seed
from pipeline.training.prediction import tta_predictions
from pipeline.training.tables import ImageTable


def write_split(cfg, folds: list[int], splits: list[str]) -> list[str]:
    ids = [f"i{k}.jpg" for k in range(len(folds))]
    path = cfg.paths.path("split_csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": ids, "label": "c0", "group": [f"g{f}" for f in folds], "split": splits,
                  "fold": folds}).to_csv(path, index=False)
    return ids


def test_holdout_members_bag_over_folds_and_cv_members_keep_every_train_row(smoke_cfg):
    ids = write_split(smoke_cfg, [0, 0, 1, 1, 0, 0], ["train"] * 4 + ["valid"] * 2)
    train = ids[:4]
    assert bagged_fold(smoke_cfg, 0) is None  # cv: a fold model's train rows are already every other fold
    assert kept_train_ids(smoke_cfg, train, 0) == set(train)
    holdout = smoke_cfg.model_copy(update={"split": smoke_cfg.split.model_copy(update={"validation": "holdout"})})
    assert [bagged_fold(holdout, m) for m in (0, 1, 2)] == [0, 1, 0]
    assert kept_train_ids(holdout, train, 0) == {"i2.jpg", "i3.jpg"}
    assert kept_train_ids(holdout, ["i0.jpg", "i1.jpg"], 0) == {"i0.jpg", "i1.jpg"}  # never empty


def test_member_seeds_follow_the_model_they_copy(smoke_cfg):
    smoke_cfg.finetune.seed, smoke_cfg.head.seed = 10, 20
    assert [member_seed(smoke_cfg, m) for m in (0, 1)] == [11, 12]
    smoke_cfg.ensemble.member_model = "head"
    assert [member_seed(smoke_cfg, m) for m in (0, 1)] == [21, 22]


class FixedPasses:
    """Stands in for a fine-tuned network: pass ``copy`` of a table gives fixed probabilities."""

    def __init__(self, passes: dict[str, list[np.ndarray]]):
        self.passes = passes
        self.calls: list[tuple[str, int]] = []

    def predict(self, table, copy=0, augment=None, seed=0):
        self.calls.append((table.ids[0], copy))
        return self.passes[table.ids[0]][copy]


def tables(n: int = 4) -> dict[str, ImageTable]:
    labels = np.arange(n) % 10
    return {"valid": ImageTable([f"v{i}" for i in range(n)], [""] * n, labels),
            "test": ImageTable([f"t{i}" for i in range(n)], [""] * n, np.full(n, -1))}


def confident(labels: np.ndarray, p: float) -> np.ndarray:
    probs = np.full((len(labels), 10), (1 - p) / 9)
    probs[np.arange(len(labels)), labels] = p
    return probs


@pytest.mark.parametrize("augmented_p, kept", [(0.9, True), (0.05, False)])
def test_holdout_keeps_tta_only_when_it_lowers_validation_log_loss(smoke_cfg, augmented_p, kept):
    cfg = smoke_cfg.model_copy(update={"split": smoke_cfg.split.model_copy(update={"validation": "holdout"}),
                                       "ensemble": smoke_cfg.ensemble.model_copy(update={"tta": 1})})
    t = tables()
    labels = t["valid"].labels
    fake = FixedPasses({"v0": [confident(labels, 0.5), confident(labels, augmented_p)],
                        "t0": [confident(labels, 0.4), confident(labels, 0.8)]})
    valid, test, figures = tta_predictions(cfg, fake, t["valid"], t["test"])
    assert figures["tta_used"] is kept
    plain_valid, plain_test = confident(labels, 0.5), confident(labels, 0.4)
    if kept:
        assert np.allclose(valid, (plain_valid + confident(labels, augmented_p)) / 2)
        assert np.allclose(test, (plain_test + confident(labels, 0.8)) / 2)
    else:
        assert np.allclose(valid, plain_valid) and np.allclose(test, plain_test)
        assert ("t0", 1) not in fake.calls  # test images are augmented only when TTA is kept


def test_cv_keeps_tta_whatever_the_fold_rows_say(smoke_cfg):
    """A fold's own rows must not decide anything about their model: TTA is configured, not chosen."""
    cfg = smoke_cfg.model_copy(update={"ensemble": smoke_cfg.ensemble.model_copy(update={"tta": 1})})
    t = tables()
    labels = t["valid"].labels
    fake = FixedPasses({"v0": [confident(labels, 0.5), confident(labels, 0.05)],
                        "t0": [confident(labels, 0.4), confident(labels, 0.8)]})
    valid, _, figures = tta_predictions(cfg, fake, t["valid"], t["test"])
    assert figures["tta_used"] is True and figures["valid_logloss_tta"] > figures["valid_logloss_plain"]
    assert np.allclose(valid, (confident(labels, 0.5) + confident(labels, 0.05)) / 2)
