"""Member stage pieces on constructed inputs: the train rows a member keeps and the TTA decision.
(The members trained end to end are in tests/test_ensemble.py.)"""

import numpy as np
import pandas as pd
import pytest

from pipeline.config import AugmentConfig
from pipeline.stages.member import images_outside_fold, member_seed, tta_predictions
from pipeline.tables import ImageTable


def folds_frame() -> pd.DataFrame:
    return pd.DataFrame({"id": [f"i{k}.jpg" for k in range(6)], "group": ["a", "a", "b", "b", "c", "c"],
                         "fold": [0, 0, 1, 1, 0, 0]})


def test_a_member_leaves_out_its_fold_or_nothing():
    folds = folds_frame()
    assert images_outside_fold(folds, 0) == {"i2.jpg", "i3.jpg"}
    assert images_outside_fold(folds, None) == set(folds["id"])
    assert images_outside_fold(folds[folds["fold"] == 0], 0) == {"i0.jpg", "i1.jpg", "i4.jpg", "i5.jpg"}  # never empty


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
def test_tta_is_kept_only_when_it_lowers_validation_log_loss(augmented_p, kept):
    t = tables()
    labels = t["valid"].labels
    fake = FixedPasses({"v0": [confident(labels, 0.5), confident(labels, augmented_p)],
                        "t0": [confident(labels, 0.4), confident(labels, 0.8)]})
    valid, test, figures = tta_predictions(fake, t, 1, AugmentConfig(), seed=0)
    assert figures["tta_used"] is kept
    plain_valid, plain_test = confident(labels, 0.5), confident(labels, 0.4)
    if kept:
        assert np.allclose(valid, (plain_valid + confident(labels, augmented_p)) / 2)
        assert np.allclose(test, (plain_test + confident(labels, 0.8)) / 2)
    else:
        assert np.allclose(valid, plain_valid) and np.allclose(test, plain_test)
        assert ("t0", 1) not in fake.calls  # test images are augmented only when TTA is kept
