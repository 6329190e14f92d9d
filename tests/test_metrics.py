"""Kaggle's multi-class log loss and the figures every predicting stage reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.metrics import (
    CLASS_COLUMNS,
    accuracy,
    evaluate,
    kaggle_logloss,
    read_hidden_labels,
    read_predictions,
    write_predictions,
)


def test_kaggle_logloss_matches_a_hand_computed_example():
    probs = np.array([
        [2, 1, 1, 0, 0, 0, 0, 0, 0, 0],  # sums to 4: true class 0 gets 2/4 = 0.5
        [0.2, 0.2, 0.2, 0.2, 0.2, 0, 0, 0, 0, 0],  # true class 9 has p = 0, clipped to 1e-15
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # sums to 10: true class 3 gets 0.1
    ], dtype=float)
    labels = np.array([0, 9, 3])
    # -(ln 0.5 + ln 1e-15 + ln 0.1) / 3 = (ln 2 + 15 ln 10 + ln 10) / 3 = (0.693147 + 34.538776 + 2.302585) / 3
    expected = (math.log(2) + 16 * math.log(10)) / 3
    assert expected == pytest.approx(12.511503, abs=1e-6)
    assert kaggle_logloss(probs, labels) == pytest.approx(expected, rel=1e-12)


def test_kaggle_logloss_clips_certainty_to_one_minus_eps():
    probs = np.eye(10)[[0, 1]]  # certain and right: -ln(1 - 1e-15) ~ 1e-15, not exactly 0
    assert kaggle_logloss(probs, np.array([0, 1])) == pytest.approx(1e-15, rel=1e-3)
    # certain and wrong costs -ln(1e-15) = 34.54 per row, however confident the model was
    assert kaggle_logloss(probs, np.array([1, 0])) == pytest.approx(15 * math.log(10))


def test_kaggle_logloss_refuses_mismatched_shapes():
    with pytest.raises(ValueError):
        kaggle_logloss(np.ones((3, 10)), np.array([0, 1]))


def test_evaluate_reports_valid_figures_and_test_figures_only_with_hidden_labels():
    valid = np.array([[0.5, 0.25, 0.25] + [0] * 7, [0.1] * 10])  # right (0.5), wrong argmax (class 0 != 4)
    valid_labels = np.array([0, 4])
    figures = evaluate(valid, valid_labels)
    assert figures.keys() == {"valid_logloss", "valid_acc"}
    assert figures["valid_logloss"] == pytest.approx((math.log(2) + math.log(10)) / 2)
    assert figures["valid_acc"] == 0.5

    test_imgs = ["img_2.jpg", "img_1.jpg"]
    test = np.array([[0.8] + [0.2 / 9] * 9, [0.2 / 9] * 9 + [0.8]])
    hidden = {"img_1.jpg": 0, "img_2.jpg": 0}  # img_2 right with 0.8, img_1 wrong with 0.2/9
    figures = evaluate(valid, valid_labels, test_imgs, test, hidden)
    assert figures["test_acc"] == 0.5
    assert figures["test_logloss"] == pytest.approx((-math.log(0.8) - math.log(0.2 / 9)) / 2)
    assert accuracy(test, np.array([0, 9])) == 1.0


def test_predictions_round_trip_and_hidden_labels(tmp_path):
    probs = np.random.default_rng(0).dirichlet(np.ones(10), size=4)
    path = write_predictions(tmp_path / "p/test.csv", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], probs)
    assert path.read_text().splitlines()[0] == "img," + ",".join(CLASS_COLUMNS)
    imgs, back = read_predictions(path)
    assert imgs == ["a.jpg", "b.jpg", "c.jpg", "d.jpg"] and np.allclose(back, probs, rtol=1e-5)
    assert read_hidden_labels(tmp_path / "none") is None
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden/test_labels.csv").write_text("img,classname\na.jpg,c3\nb.jpg,c0\n")
    assert read_hidden_labels(tmp_path / "hidden") == {"a.jpg": 3, "b.jpg": 0}
