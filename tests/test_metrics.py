"""Kaggle's multi-class log loss and the figures every predicting stage reports."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.errors import BadInputError, StageError
from pipeline.metrics import (
    accuracy,
    chain_steps,
    evaluate,
    kaggle_logloss,
    normalise,
    prediction_classes,
    read_hidden_labels,
    read_predictions,
    reliability_bins,
    require_finite,
    write_predictions,
)

CLASSES = ("cat", "dog", "fox", "owl")  # any competition's class names, in its sample submission's order


def test_normalise_rescales_each_row_over_the_last_axis():
    rows = normalise(np.array([[2, 1, 1], [0.5, 0.25, 0.25]], dtype=np.float32))
    assert rows.dtype == np.float64
    np.testing.assert_array_equal(rows, [[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])
    stacked = normalise(np.arange(1, 13, dtype=float).reshape(2, 2, 3))  # (models, rows, classes)
    np.testing.assert_allclose(stacked.sum(axis=-1), np.ones((2, 2)))


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


def test_predictions_round_trip_with_the_competitions_class_columns(tmp_path):
    """Predictions files are ``id,<class columns>`` in competition order, whatever the class names."""
    probs = np.random.default_rng(0).dirichlet(np.ones(4), size=4)
    ids = ["a.jpg", "b.jpg", "007", "d.jpg"]  # "007" stays a string id
    path = write_predictions(tmp_path / "p/test.csv", ids, probs, CLASSES)
    assert path.read_text().splitlines()[0] == "id,cat,dog,fox,owl"
    assert prediction_classes(path) == list(CLASSES)
    back_ids, back = read_predictions(path)
    assert back_ids == ids and np.allclose(back, probs, rtol=1e-5)
    with pytest.raises(ValueError, match="does not match 4 images x 3 classes"):
        write_predictions(tmp_path / "p/other.csv", ids, probs, CLASSES[:3])


def test_read_predictions_keeps_ids_verbatim_and_reads_empty_cells_as_nan(tmp_path):
    """Ids such as ``NA`` stay ids; an empty or NaN probability reads as NaN (so its row and column can be
    named) instead of failing the whole file."""
    path = tmp_path / "valid.csv"
    path.write_text("id,cat,dog\nNA,0.5,\nnull,NaN,0.5\n007,inf,0.25\n")
    ids, probs = read_predictions(path)
    assert ids == ["NA", "null", "007"]
    assert np.isnan(probs[0, 1]) and np.isnan(probs[1, 0]) and np.isinf(probs[2, 0])
    assert probs[0, 0] == 0.5 and probs[2, 1] == 0.25


def test_hidden_labels_map_ids_to_class_indices(tmp_path):
    """test_labels.csv (id,label) -> id -> index in the given classes; None without the file; an
    unknown label is refused with file and row, never mapped to a wrong index."""
    assert read_hidden_labels(tmp_path / "none", CLASSES) is None
    (tmp_path / "hidden").mkdir()
    path = tmp_path / "hidden/test_labels.csv"
    path.write_text("id,label\na.jpg,owl\nb.jpg,cat\n")
    assert read_hidden_labels(tmp_path / "hidden", CLASSES) == {"a.jpg": 3, "b.jpg": 0}
    path.write_text("id,label\na.jpg,owl\nb.jpg,cow\n")
    with pytest.raises(BadInputError, match="label 'cow' is not a class") as info:
        read_hidden_labels(tmp_path / "hidden", CLASSES)
    assert info.value.file == path and info.value.row == 3


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_write_predictions_refuses_non_finite_values_naming_the_file(tmp_path, bad):
    """No stage writes a NaN or infinite probability: refused with file, row and class column; nothing written."""
    probs = np.full((3, 4), 0.25)
    probs[1, 2] = bad
    path = tmp_path / "p/valid.csv"
    with pytest.raises(StageError) as info:
        write_predictions(path, ["a", "b", "c"], probs, CLASSES)
    message = str(info.value)
    assert message.startswith(f"{path}: a predicted probability is not finite at row 3, column fox ({bad})"), message
    assert not path.exists() and list(tmp_path.rglob("*.csv")) == []


def test_require_finite_passes_finite_values_and_names_the_first_bad_one():
    """The shared guard: finite values pass; otherwise the first bad row (header = row 1) and column."""
    require_finite(np.array([[0.5, 0.5], [1.0, 0.0]]), "x", "f.csv")
    with pytest.raises(StageError, match=r"^f.csv: a loss is not finite at row 2 \(nan\)"):
        require_finite(np.array([np.nan, 1.0, np.inf]), "a loss", "f.csv")
    with pytest.raises(StageError, match=r"row 4, column 2 \(inf\)"):
        require_finite(np.array([[1.0, 1.0], [1.0, 1.0], [1.0, np.inf]]), "x", "f.csv")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf, on purpose
def test_evaluate_refuses_non_finite_figures():
    """A NaN or inf prediction would make a NaN log loss: evaluate raises, naming the figure, instead of
    reporting it."""
    good = np.full((2, 3), 1 / 3)
    labels = np.array([0, 1])
    bad = good.copy()
    bad[1, 2] = np.nan
    with pytest.raises(StageError, match="valid_logloss is nan"):
        evaluate(bad, labels)
    inf = good.copy()
    inf[0, 0] = np.inf
    with pytest.raises(StageError, match="test_logloss is nan"):
        evaluate(good, labels, ["t1", "t2"], inf, {"t1": 0, "t2": 2})
    assert evaluate(good, labels, ["t1", "t2"], good, {"t1": 0, "t2": 2})["test_logloss"] == pytest.approx(np.log(3))


def test_reliability_bins_put_a_confidence_on_an_edge_in_the_bin_it_opens():
    """Top-class confidences 0.7, 0.65, 0.6 and 1.0: 0.6 opens [0.6, 0.7), 0.7 opens [0.7, 0.8), 1.0 is in the last bin."""
    probs = np.array([[0.3, 0.7], [0.35, 0.65], [0.6, 0.4], [1.0, 0.0]])
    confidence, accuracy, count = reliability_bins(probs, np.array([1, 0, 0, 0]))
    assert count == [2, 1, 1]
    assert confidence == pytest.approx([0.625, 0.7, 1.0])
    assert accuracy == [0.5, 1.0, 1.0]


def test_chain_steps_compare_each_chain_model_with_the_nearest_one_before_it():
    models = {"member0": {"valid_logloss": 0.1}, "pseudo": {"valid_logloss": 0.5}, "head": {"valid_logloss": 0.4},
              "finetune": {"valid_logloss": 0.4}}
    assert chain_steps(models) == [("head", "finetune", False), ("finetune", "pseudo", True)]  # a tie is no worse
    del models["finetune"]
    assert chain_steps(models) == [("head", "pseudo", True)]
    assert chain_steps({"head": {}, "pseudo": {"valid_logloss": 0.5}}) == []  # no figure: not a step
