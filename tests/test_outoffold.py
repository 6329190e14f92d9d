"""pipeline.outoffold: each fold model's test predictions kept as one file (round trip, bad rows
refused with file and row), and the label-free gain of averaging fold models checked against the gain
labels reveal."""

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import BadInputError, StageError
from pipeline.metrics import kaggle_logloss
from pipeline.outoffold import fold_averaging_gain, read_test_folds, write_test_folds

CLASSES = ("cat", "dog", "fox")


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def fold_models(n: int, k: int, noise: float, seed: int = 0) -> np.ndarray:
    """(k, n, classes): k models that share a signal and disagree by independent noise."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(0, 2.0, (n, len(CLASSES)))
    return softmax(shared + rng.normal(0, noise, (k, n, len(CLASSES))))


def test_the_gain_is_what_averaging_saves_when_labels_follow_the_averaged_predictions():
    """Labels drawn from the averaged predictions (they are calibrated): the mean log loss of the fold
    models less that of their mean is, in expectation, exactly the gain."""
    per_fold = fold_models(20_000, 3, noise=1.0)
    averaged = per_fold.mean(axis=0)
    rng = np.random.default_rng(1)
    labels = (averaged.cumsum(axis=1) > rng.random((len(averaged), 1))).argmax(axis=1)
    saved = np.mean([kaggle_logloss(p, labels) for p in per_fold]) - kaggle_logloss(averaged, labels)
    gain = fold_averaging_gain(averaged, per_fold)
    assert saved > 0.05  # the example averages something worth estimating
    assert gain == pytest.approx(saved, rel=0.1)


def test_the_gain_grows_with_disagreement_and_is_zero_when_the_folds_agree():
    same = np.repeat(fold_models(500, 1, noise=0.0), 3, axis=0)
    assert fold_averaging_gain(same.mean(axis=0), same) == pytest.approx(0.0, abs=1e-12)
    gains = [fold_averaging_gain((p := fold_models(500, 3, noise)).mean(axis=0), p) for noise in (0.3, 1.0, 2.0)]
    assert 0 < gains[0] < gains[1] < gains[2]


def test_one_fold_averages_nothing():
    per_fold = fold_models(10, 1, noise=1.0)
    assert fold_averaging_gain(per_fold[0], per_fold) is None


def test_a_zero_probability_gives_a_finite_gain():
    per_fold = np.array([[[1.0, 0.0, 0.0]], [[0.5, 0.5, 0.0]]])
    assert np.isfinite(fold_averaging_gain(per_fold.mean(axis=0), per_fold))


def test_test_folds_round_trip_in_the_callers_row_order(tmp_path):
    ids = ["t0.jpg", "t1.jpg", "t2.jpg"]
    per_fold = fold_models(3, 2, noise=1.0)
    path = write_test_folds(tmp_path / "test_folds.csv", ids, per_fold, [0, 1], CLASSES)
    assert path.read_text().splitlines()[0] == "id,fold,cat,dog,fox"
    np.testing.assert_allclose(read_test_folds(path, ids, CLASSES, "oof"), per_fold, atol=1e-5)
    got = read_test_folds(path, ids[::-1], CLASSES, "oof")
    np.testing.assert_allclose(got, per_fold[:, ::-1], atol=1e-5)
    assert read_test_folds(tmp_path / "absent.csv", ids, CLASSES, "oof") is None
    with pytest.raises(ValueError, match="2 folds of test predictions, 3 fold ids"):
        write_test_folds(tmp_path / "x.csv", ids, per_fold, [0, 1, 2], CLASSES)


def test_a_bad_test_folds_row_is_refused_naming_file_and_row(tmp_path):
    ids = ["t0.jpg", "t1.jpg"]
    path = write_test_folds(tmp_path / "test_folds.csv", ids, fold_models(2, 2, noise=1.0), [0, 1], CLASSES)
    frame = pd.read_csv(path)
    frame.loc[3, "dog"] = float("nan")  # fold 1's second image, line 5 of the file
    frame.to_csv(path, index=False)
    with pytest.raises(BadInputError, match=r"test_folds.csv.*row 5.*t1.jpg"):
        read_test_folds(path, ids, CLASSES, "oof")
    frame.loc[3, "id"], frame.loc[3, "dog"] = "t0.jpg", 0.2  # t0 twice in fold 1, t1 missing
    frame.to_csv(path, index=False)
    with pytest.raises(BadInputError, match=r"row 5: id 't0.jpg' appears twice \(first at row 4\)"):
        read_test_folds(path, ids, CLASSES, "oof")
    frame.drop(index=3).to_csv(path, index=False)
    with pytest.raises(StageError, match=r"test_folds.csv: 1 expected id\(s\) missing .*'t1.jpg'.*rerun oof"):
        read_test_folds(path, ids, CLASSES, "oof")
