"""calibrate stage: temperature and clip fitted on the out-of-fold (OOF) rows, applied to test only when
a nested estimate (cv: each fold calibrated by a fit on the other folds; holdout: folds over the
validation drivers) beats no calibration; the OOF rows written are the nested ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.chain import Calibration, apply_calibration, clip_probs, temperature_scale
from pipeline.competition import Competition, write_competition
from pipeline.config import load_profile
from pipeline.ensembling.calibration import (
    cross_fitted_probs,
    fit_calibration,
    fit_clip,
    fit_temperature,
    reliability_curve,
)
from pipeline.errors import BadInputError, StageError
from pipeline.folds import group_folds, nested_folds
from pipeline.metrics import kaggle_logloss, read_oof, read_predictions, write_predictions
from pipeline.stages.calibrate import run
from pipeline.synthetic.drivers import CLASSES


def model_outputs(n: int, sharpness: float, seed: int = 0, accuracy: float = 0.7,
                  k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities (``k`` classes) of a model that is right ``accuracy`` of the time;
    ``sharpness`` scales its logits (> 1: over-confident, < 1: under-confident)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    predicted = np.where(rng.random(n) < accuracy, labels, rng.integers(0, k, n))
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), predicted] += 2.5
    probs = np.exp(sharpness * logits)
    return labels, probs / probs.sum(axis=1, keepdims=True)


def test_temperature_softens_an_overconfident_model_without_changing_argmax():
    labels, probs = model_outputs(600, sharpness=4.0)
    t = fit_temperature(probs, labels)
    scaled = temperature_scale(probs, t)
    assert t > 2
    assert kaggle_logloss(scaled, labels) < kaggle_logloss(probs, labels) - 0.3
    assert (scaled.argmax(axis=1) == probs.argmax(axis=1)).all()
    assert np.allclose(scaled.sum(axis=1), 1)


def test_temperature_sharpens_an_underconfident_model():
    labels, probs = model_outputs(600, sharpness=0.3)
    assert fit_temperature(probs, labels) < 1


def test_clip_caps_confident_mistakes():
    labels, probs = model_outputs(600, sharpness=1.0)
    probs[:30] = 1e-6
    probs[np.arange(30), (labels[:30] + 1) % 10] = 1.0  # 5% confidently wrong
    lo, hi = fit_clip(probs, labels)
    assert hi < 0.999 and lo == pytest.approx((1 - hi) / 9)
    clipped = clip_probs(probs, lo, hi)
    assert np.allclose(clipped.sum(axis=1), 1)
    # Clipping never lowers a row's sum below 1 (hi + 9 lo = 1), so renormalising only shrinks: max <= hi.
    assert clipped.max() <= hi + 1e-12 and clipped.min() > 0
    assert kaggle_logloss(clipped, labels) < kaggle_logloss(probs, labels)


def test_clip_bound_uses_k_minus_one_for_five_classes():
    """lo = (1 - hi) / (K - 1) for any K: a row at hi with the rest at lo sums to 1, so clipping then
    renormalising never pushes the top probability above hi (with /9 on 5 classes it would)."""
    labels, probs = model_outputs(600, sharpness=1.0, k=5)
    probs[:30] = 1e-6
    probs[np.arange(30), (labels[:30] + 1) % 5] = 1.0  # 5% confidently wrong
    lo, hi = fit_clip(probs, labels)
    assert hi < 0.999 and lo == pytest.approx((1 - hi) / 4)
    assert hi + 4 * lo == pytest.approx(1.0)
    at_hi = clip_probs(np.array([[1.0, 0, 0, 0, 0], [0.2] * 5]), lo, hi)
    assert np.allclose(at_hi[0], [hi, lo, lo, lo, lo]) and np.allclose(at_hi[1], 0.2)
    clipped = clip_probs(probs, lo, hi)
    assert np.allclose(clipped.sum(axis=1), 1) and clipped.max() <= hi + 1e-12 and clipped.min() > 0


def test_no_clip_when_it_does_not_help():
    labels = np.arange(50) % 10
    probs = np.full((50, 10), 1e-4)
    probs[np.arange(50), labels] = 1.0  # always right and confident: any clip only costs
    assert fit_clip(probs, labels) == (0.0, 1.0)


def test_switches_and_identity():
    labels, probs = model_outputs(200, sharpness=3.0)
    assert fit_calibration(probs, labels, temperature=False, clip=False) == Calibration()
    assert np.allclose(apply_calibration(probs, Calibration()), probs)
    only_t = fit_calibration(probs, labels, temperature=True, clip=False)
    assert only_t.temperature != 1 and (only_t.clip_lo, only_t.clip_hi) == (0.0, 1.0)
    only_clip = fit_calibration(probs, labels, temperature=False, clip=True)
    assert only_clip.temperature == 1 and only_clip.clip_hi < 1


def test_cross_fitting_calibrates_each_fold_with_the_others_fit():
    labels, probs = model_outputs(400, sharpness=3.0)
    drivers = np.repeat(["p001", "p002", "p003", "p004"], 100)
    folds = group_folds(drivers, 2, 0)
    crossed = cross_fitted_probs(probs, labels, folds)
    assert crossed is not None and np.allclose(crossed.sum(axis=1), 1)
    for fold in (0, 1):
        held = folds == fold
        assert set(drivers[held]).isdisjoint(drivers[~held]) and held.sum() == 200  # whole drivers
        expected = apply_calibration(probs[held], fit_calibration(probs[~held], labels[~held]))
        assert np.allclose(crossed[held], expected)
    assert not np.allclose(crossed, apply_calibration(probs, fit_calibration(probs, labels)))  # not in-sample
    assert cross_fitted_probs(probs, labels, np.zeros(400, dtype=int)) is None  # one fold: nothing to nest over
    assert cross_fitted_probs(probs, labels, None) is None


def test_nested_folds_are_the_cv_folds_or_folds_over_validation_drivers():
    folds = np.array([1, 0, 2, 1, 0, 2])
    drivers = np.array(["p1", "p1", "p2", "p2", "p3", "p3"])
    assert nested_folds(folds, drivers, "cv", 2, 0).tolist() == folds.tolist()
    assert nested_folds(np.zeros(6, dtype=int), drivers, "holdout", 2, 0).tolist() == group_folds(drivers, 2, 0).tolist()
    assert nested_folds(np.zeros(6, dtype=int), drivers, "cv", 2, 0) is None  # a single fold


# ---------------------------------------------------------------------------- the stage

ENSEMBLE_OOF = "data/predictions/ensemble/oof.csv"
CALIBRATED_OOF = "data/predictions/calibrate/oof.csv"


def holdout_cfg(tmp_path: Path, *overrides: str):
    """The smoke profile in holdout mode (``split.fold_ids`` derived again: [0])."""
    return load_profile("smoke", ["split.validation=holdout", *overrides]).at(tmp_path)


def write_inputs(root: Path, n_valid: int = 300, n_test: int = 200, classes: tuple[str, ...] = CLASSES,
                 has_groups: bool = True, validation: str = "cv", n_folds: int = 2) -> None:
    """competition.json, split.csv (id,label,group,split,fold), the ensemble's out-of-fold predictions
    (oof.csv: id,fold,<classes>, in split.csv order) and test predictions, and hidden test labels.

    cv: ``n_valid`` labelled rows, all split "train" and all out of fold; driver p00g (g = i % 6) in
    fold g % n_folds, so the folds interleave in split.csv. holdout: 20 train rows of driver p009 first,
    then ``n_valid`` validation rows of drivers p000-p002, the out-of-fold rows of fold 0. Without
    groups every image is its own group, as the split stage writes it (cv fold: i % n_folds)."""
    labels, probs = model_outputs(n_valid + n_test, sharpness=3.0, seed=1, k=len(classes))
    held_ids = [f"img_v{i}.jpg" for i in range(n_valid)]
    test_ids = [f"img_t{i}.jpg" for i in range(n_test)]
    write_competition(root / "data/raw", Competition(classes, "img", has_groups, "subject" if has_groups else "image",
                                                     "folder", "synthetic"))
    held_labels = [classes[c] for c in labels[:n_valid]]
    if validation == "cv":
        drivers = [f"p00{i % 6}" for i in range(n_valid)]
        split = pd.DataFrame({
            "id": held_ids, "label": held_labels, "group": drivers if has_groups else held_ids, "split": "train",
            "fold": [(i % 6 if has_groups else i) % n_folds for i in range(n_valid)],
        })
        oof_folds = split["fold"].to_numpy()
    else:
        train_ids = [f"img_tr{i}.jpg" for i in range(20)]
        drivers = ["p009"] * 20 + [f"p00{i % 3}" for i in range(n_valid)]
        split = pd.DataFrame({
            "id": train_ids + held_ids,
            "label": [classes[0]] * 20 + held_labels,
            "group": drivers if has_groups else train_ids + held_ids,
            "split": ["train"] * 20 + ["valid"] * n_valid,
            "fold": [int(d[1:]) % n_folds for d in drivers] if has_groups else [i % n_folds for i in range(20 + n_valid)],
        })
        oof_folds = np.zeros(n_valid, dtype=int)  # one fold model: the validation split is fold 0's
    split.to_csv(root / "data/split.csv", index=False)
    write_predictions(root / ENSEMBLE_OOF, held_ids, probs[:n_valid], classes, folds=oof_folds)
    write_predictions(root / "data/predictions/ensemble/test.csv", test_ids, probs[n_valid:], classes)
    (root / "data/hidden").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": test_ids, "label": [classes[c] for c in labels[n_valid:]]}).to_csv(
        root / "data/hidden/test_labels.csv", index=False)


def held_out_rows(root: Path, validation: str) -> pd.DataFrame:
    """split.csv's out-of-fold rows: every row in cv mode, the validation split in holdout mode."""
    split = pd.read_csv(root / "data/split.csv", dtype={"fold": int})
    return split[split["split"] == "valid"] if validation == "holdout" else split


def label_index(labels: pd.Series, classes: tuple[str, ...] = CLASSES) -> np.ndarray:
    return np.array([classes.index(c) for c in labels])


def test_stage_writes_nested_calibrated_oof_rows_and_figures(smoke_cfg, tmp_path):
    write_inputs(tmp_path)
    figures = run(smoke_cfg)
    for key in ("valid_logloss", "valid_acc", "test_logloss", "test_acc", "valid_logloss_before", "test_logloss_before",
                "valid_logloss_nested", "valid_logloss_insample", "applied", "temperature", "clip_lo", "clip_hi",
                "fitted_temperature", "fitted_clip_lo", "fitted_clip_hi", "curve", "n_valid", "n_valid_groups",
                "n_test", "validation"):
        assert key in figures, key
    assert "valid_logloss_crossfit" not in figures
    assert figures["validation"] == "cv" and figures["applied"] is True
    assert (figures["n_valid"], figures["n_valid_groups"], figures["n_test"]) == (300, 6, 200)
    assert figures["valid_logloss_nested"] < figures["valid_logloss_before"]
    assert figures["valid_logloss"] == figures["valid_logloss_nested"]  # what is written: the nested rows
    assert figures["valid_logloss_insample"] <= figures["valid_logloss_nested"]  # in-sample is the optimistic one
    assert figures["test_logloss"] < figures["test_logloss_before"]  # the fit transfers to unseen rows
    applied = (figures["temperature"], figures["clip_lo"], figures["clip_hi"])
    assert applied == (figures["fitted_temperature"], figures["fitted_clip_lo"], figures["fitted_clip_hi"])
    assert figures["temperature"] > 1
    assert json.loads(smoke_cfg.paths.stage_metrics_file("calibrate").read_text()) == figures

    split = held_out_rows(tmp_path, "cv")
    path = tmp_path / CALIBRATED_OOF
    assert path.read_text().splitlines()[0] == "id,fold," + ",".join(CLASSES)
    ids, folds, oof = read_oof(path)
    assert ids == split["id"].tolist() and folds.tolist() == split["fold"].tolist()  # split.csv order and folds
    labels = label_index(split["label"])
    assert np.allclose(oof.sum(axis=1), 1, atol=1e-5)
    assert kaggle_logloss(oof, labels) == pytest.approx(figures["valid_logloss"], abs=1e-4)
    curve = figures["curve"]
    assert sum(b["n"] for b in curve) == 300
    assert [b["n"] for b in curve] == [b["n"] for b in reliability_curve(oof, labels)]
    test_ids, test = read_predictions(tmp_path / "data/predictions/calibrate/test.csv")
    assert test_ids == [f"img_t{i}.jpg" for i in range(200)]
    assert np.allclose(test.sum(axis=1), 1, atol=1e-5) and test.max() <= figures["clip_hi"] + 1e-5


def test_cv_writes_each_folds_rows_calibrated_by_a_fit_on_the_other_folds(tmp_path):
    """Three folds; the ensemble's rows in another order than split.csv (matched by id): fold k's rows
    written are ``apply_calibration(rows, fit_calibration(the other folds' rows))``, not the in-sample fit."""
    cfg = load_profile("smoke", ["split.n_folds=3"]).at(tmp_path)
    write_inputs(tmp_path, n_folds=3)
    source = tmp_path / ENSEMBLE_OOF
    in_ids, probs = read_predictions(source)
    pd.read_csv(source, dtype=str).iloc[::-1].to_csv(source, index=False)
    figures = run(cfg)
    assert figures["applied"] is True

    split = held_out_rows(tmp_path, "cv")
    assert in_ids == split["id"].tolist()
    labels = label_index(split["label"])
    ids, folds, written = read_oof(tmp_path / CALIBRATED_OOF)
    assert ids == in_ids and sorted(set(folds.tolist())) == [0, 1, 2]
    for fold in (0, 1, 2):
        rows = folds == fold
        expected = apply_calibration(probs[rows], fit_calibration(probs[~rows], labels[~rows]))
        np.testing.assert_allclose(written[rows], expected, rtol=1e-5, atol=1e-7)
    insample = apply_calibration(probs, fit_calibration(probs, labels))
    assert not np.allclose(written, insample, rtol=1e-5, atol=1e-7)
    assert kaggle_logloss(insample, labels) == pytest.approx(figures["valid_logloss_insample"], abs=1e-6)


def test_holdout_calibrates_the_validation_split_nested_over_its_drivers(tmp_path):
    cfg = holdout_cfg(tmp_path)
    write_inputs(tmp_path, validation="holdout")
    figures = run(cfg)
    assert figures["validation"] == "holdout" and figures["applied"] is True
    assert (figures["n_valid"], figures["n_valid_groups"], figures["n_test"]) == (300, 3, 200)
    assert figures["valid_logloss"] == figures["valid_logloss_nested"] < figures["valid_logloss_before"]

    valid = held_out_rows(tmp_path, "holdout")
    labels = label_index(valid["label"])
    _, probs = read_predictions(tmp_path / ENSEMBLE_OOF)
    ids, folds, written = read_oof(tmp_path / CALIBRATED_OOF)
    assert ids == valid["id"].tolist() and set(folds.tolist()) == {0}  # only validation rows, fold 0
    over_drivers = group_folds(valid["group"].to_numpy(), cfg.calibrate.cross_fit_folds, cfg.calibrate.seed)
    np.testing.assert_allclose(written, cross_fitted_probs(probs, labels, over_drivers), rtol=1e-5, atol=1e-7)


def test_stage_switches_off(tmp_path):
    write_inputs(tmp_path)
    cfg = load_profile("smoke", {"calibrate.temperature": False, "calibrate.clip": False}).at(tmp_path)
    figures = run(cfg)
    assert (figures["temperature"], figures["clip_lo"], figures["clip_hi"]) == (1.0, 0.0, 1.0)
    assert figures["fitted_temperature"] == 1.0 and figures["fitted_clip_hi"] == 1.0
    assert figures["applied"] is False  # the identity never beats itself
    assert figures["valid_logloss"] == pytest.approx(figures["valid_logloss_before"])
    assert figures["test_logloss"] == pytest.approx(figures["test_logloss_before"])


@pytest.mark.parametrize("validation", ["cv", "holdout"])
def test_stage_keeps_predictions_when_the_fit_does_not_transfer_across_folds(tmp_path, validation):
    """One fold (cv) or validation driver (holdout) over-confident, the other under-confident: a
    temperature fitted on both looks good in-sample, but fitted on one it hurts the other, so the nested
    estimate loses to no calibration and nothing is applied."""
    cfg = holdout_cfg(tmp_path) if validation == "holdout" else load_profile("smoke").at(tmp_path)
    write_inputs(tmp_path, n_valid=200, validation=validation)
    labels_a, over = model_outputs(100, sharpness=3.0, seed=2)
    labels_b, under = model_outputs(100, sharpness=0.4, seed=3, accuracy=1.0)
    split_csv = tmp_path / "data/split.csv"
    split = pd.read_csv(split_csv)
    held = split.index[split["split"] == "valid"] if validation == "holdout" else split.index
    split.loc[held, "group"] = ["p001"] * 100 + ["p002"] * 100
    split.loc[held, "label"] = [f"c{c}" for c in np.concatenate([labels_a, labels_b])]
    if validation == "cv":
        split.loc[held, "fold"] = [0] * 100 + [1] * 100
    split.to_csv(split_csv, index=False)
    oof_folds = split.loc[held, "fold"] if validation == "cv" else np.zeros(200, dtype=int)
    oof = np.concatenate([over, under])
    write_predictions(tmp_path / ENSEMBLE_OOF, split.loc[held, "id"].tolist(), oof, CLASSES, folds=oof_folds)
    figures = run(cfg)
    assert figures["valid_logloss_insample"] < figures["valid_logloss_before"]  # the fit looks good in-sample
    assert figures["valid_logloss_nested"] > figures["valid_logloss_before"]  # and hurts the fold it never saw
    assert figures["applied"] is False
    assert (figures["temperature"], figures["clip_lo"], figures["clip_hi"]) == (1.0, 0.0, 1.0)
    assert figures["valid_logloss"] == pytest.approx(figures["valid_logloss_before"])
    assert figures["test_logloss"] == pytest.approx(figures["test_logloss_before"])
    _, written = read_predictions(tmp_path / CALIBRATED_OOF)
    _, given = read_predictions(tmp_path / ENSEMBLE_OOF)
    np.testing.assert_allclose(written, given, rtol=1e-5)  # the input rows, not the nested ones


@pytest.mark.parametrize(("validation", "stranger"), [("cv", "img_t3.jpg"), ("holdout", "img_tr3.jpg")])
def test_stage_refuses_rows_that_are_not_out_of_fold_rows_of_the_split(tmp_path, validation, stranger):
    """cv: a test image (every labelled row is out of fold); holdout: a train image of the split."""
    cfg = holdout_cfg(tmp_path) if validation == "holdout" else load_profile("smoke").at(tmp_path)
    write_inputs(tmp_path, validation=validation)
    path = tmp_path / ENSEMBLE_OOF
    df = pd.read_csv(path)
    df.loc[4, "id"] = stranger
    df.to_csv(path, index=False)
    with pytest.raises(BadInputError, match=rf"oof.csv, row 6: {stranger} is not an out-of-fold row of the split") as info:
        run(cfg)
    assert info.value.file == path and info.value.row == 6


def test_stage_refuses_oof_rows_missing_or_twice(smoke_cfg, tmp_path):
    write_inputs(tmp_path)
    path = tmp_path / ENSEMBLE_OOF
    df = pd.read_csv(path)
    df.drop(index=4).to_csv(path, index=False)
    with pytest.raises(StageError, match=r"oof.csv: 1 row\(s\) missing \(e.g. 'img_v4.jpg'\): rerun the ensemble"):
        run(smoke_cfg)
    pd.concat([df, df.iloc[[7]]]).to_csv(path, index=False)  # img_v7.jpg at rows 9 and 302
    with pytest.raises(BadInputError, match=r"oof.csv, row 302: id 'img_v7.jpg' appears twice \(first at row 9\)"):
        run(smoke_cfg)


def test_stage_refuses_unusable_probabilities(smoke_cfg, tmp_path):
    write_inputs(tmp_path)
    path = tmp_path / "data/predictions/ensemble/test.csv"
    df = pd.read_csv(path)
    df.loc[2, "c5"] = np.nan
    df.to_csv(path, index=False)
    with pytest.raises(BadInputError, match=r"test.csv, row 4: img_t2.jpg: c5 = nan") as info:
        run(smoke_cfg)
    assert info.value.file == path and info.value.row == 4


@pytest.mark.parametrize("value", ["-0.1", "inf"])
def test_stage_refuses_a_negative_or_infinite_probability_naming_its_column(smoke_cfg, tmp_path, value):
    write_inputs(tmp_path)
    path = tmp_path / ENSEMBLE_OOF
    df = pd.read_csv(path, dtype=str)
    df.loc[6, "c7"] = value
    df.to_csv(path, index=False)
    with pytest.raises(BadInputError, match=rf"oof.csv, row 8: img_v6.jpg: c7 = {value}") as info:
        run(smoke_cfg)
    assert info.value.file == path and info.value.row == 8


def test_stage_refuses_predictions_whose_columns_are_not_the_competitions(smoke_cfg, tmp_path):
    """Columns are matched to competition.json's classes by name and order, never by position alone."""
    write_inputs(tmp_path)
    path = tmp_path / "data/predictions/ensemble/test.csv"
    df = pd.read_csv(path)
    df[["id", *CLASSES[1:], CLASSES[0]]].to_csv(path, index=False)
    with pytest.raises(BadInputError, match=r"test.csv, row 1: expected columns id,c0,c1,.*got id,c1,") as info:
        run(smoke_cfg)
    assert info.value.file == path


def test_stage_refuses_an_unknown_label_naming_its_row_in_split_csv(smoke_cfg, tmp_path):
    """An out-of-fold label that is not a class is refused with split.csv's own row, not the prediction's."""
    write_inputs(tmp_path)
    split_csv = tmp_path / "data/split.csv"
    split = pd.read_csv(split_csv)
    split.loc[25, "label"] = "c10"  # img_v25.jpg: row 27 of split.csv
    split.to_csv(split_csv, index=False)
    with pytest.raises(BadInputError, match="label 'c10' is not a class") as info:
        run(smoke_cfg)
    assert info.value.file == split_csv and info.value.row == 27


def test_stage_calibrates_a_five_class_problem_without_groups(smoke_cfg, tmp_path):
    """Any competition: string class names from competition.json, every image its own group, and a clip
    bound of (1 - hi) / (K - 1)."""
    classes = ("cat", "dog", "fox", "owl", "yak")
    write_inputs(tmp_path, classes=classes, has_groups=False)
    figures = run(smoke_cfg)
    assert figures["n_valid_groups"] == 300 and figures["valid_logloss_nested"] is not None
    assert figures["applied"] is True and figures["valid_logloss"] < figures["valid_logloss_before"]
    assert figures["clip_hi"] < 1 and figures["clip_lo"] == pytest.approx((1 - figures["clip_hi"]) / 4, abs=1e-6)
    assert read_oof(tmp_path / CALIBRATED_OOF)[1].tolist() == [i % 2 for i in range(300)]
    assert (tmp_path / CALIBRATED_OOF).read_text().splitlines()[0] == "id,fold," + ",".join(classes)
    path = tmp_path / "data/predictions/calibrate/test.csv"
    assert path.read_text().splitlines()[0] == "id," + ",".join(classes)
    _, probs = read_predictions(path)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5) and probs.max() <= figures["clip_hi"] + 1e-5


def test_stage_needs_ingest_split_and_the_ensemble(smoke_cfg, tmp_path):
    write_inputs(tmp_path)
    (tmp_path / ENSEMBLE_OOF).unlink()
    with pytest.raises(StageError, match=r"ensemble/oof.csv not found: run the ensemble stage first"):
        run(smoke_cfg)
    (tmp_path / "data/split.csv").unlink()
    with pytest.raises(StageError, match="split.csv not found: run the split stage first"):
        run(smoke_cfg)
    for path in (tmp_path / "data/raw").iterdir():
        path.unlink()
    with pytest.raises(StageError, match="competition.json not found: run the ingest stage first"):
        run(smoke_cfg)


# ---------------------------------------------------------------------------- the fold-averaged submission


def write_test_folds(root: Path, n_folds: int = 3, noise: float = 1.0) -> np.ndarray:
    """Each fold's ensemble alone on test (noisy around the written test predictions), and test.csv
    rewritten as their mean, as the ensemble stage writes them."""
    from pipeline.outoffold import write_test_folds as write

    test_path = root / "data/predictions/ensemble/test.csv"
    ids, test = read_predictions(test_path)
    rng = np.random.default_rng(5)
    logits = np.log(test)[None] + rng.normal(0, noise, (n_folds, *test.shape))
    per_fold = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    write(root / "data/predictions/ensemble/test_folds.csv", ids, per_fold, list(range(n_folds)), CLASSES)
    write_predictions(test_path, ids, per_fold.mean(axis=0), CLASSES)
    return per_fold


@pytest.mark.parametrize("method", ["cv", "cv_less_gain", "cv_less_half_gain", "cv_plus_shift"])
def test_the_submission_estimate_is_the_configured_candidate_with_an_interval_around_it(tmp_path, method):
    from pipeline.outoffold import fold_averaging_gain

    cfg = load_profile("smoke", ["split.n_folds=3", f"calibrate.estimate={method}"]).at(tmp_path)
    write_inputs(tmp_path, n_folds=3)
    per_fold = write_test_folds(tmp_path)
    figures = run(cfg)
    assert figures["applied"] is True
    calibration = Calibration(figures["temperature"], figures["clip_lo"], figures["clip_hi"])
    _, submitted = read_predictions(tmp_path / "data/predictions/calibrate/test.csv")
    gain = fold_averaging_gain(submitted, [apply_calibration(p, calibration) for p in per_fold])
    assert figures["fold_averaging_gain"] == pytest.approx(gain, abs=1e-5) and gain > 0.01
    candidates = figures["submission_estimates"]
    assert candidates["cv"] == pytest.approx(figures["valid_logloss"], abs=1e-5)
    assert candidates["cv_less_gain"] == pytest.approx(figures["valid_logloss"] - gain, abs=1e-5)
    assert candidates["cv_less_half_gain"] == pytest.approx(figures["valid_logloss"] - gain / 2, abs=1e-5)
    assert figures["submission_estimate_method"] == method
    assert figures["submission_logloss_estimate"] == candidates[method]
    assert figures["submission_logloss_low"] < figures["submission_logloss_estimate"] < figures["submission_logloss_high"]
    assert figures["submission_interval_level"] == cfg.calibrate.interval


def test_without_fold_models_to_average_the_estimate_is_the_validation_log_loss(tmp_path):
    cfg = holdout_cfg(tmp_path)
    write_inputs(tmp_path, validation="holdout")
    figures = run(cfg)
    assert figures["fold_averaging_gain"] is None
    assert figures["submission_logloss_estimate"] == figures["valid_logloss"]
    assert set(figures["submission_estimates"].values()) == {figures["valid_logloss"]}  # nothing to correct


def test_a_bad_test_folds_row_is_refused_and_the_last_output_stays(smoke_cfg, tmp_path, capsys):
    write_inputs(tmp_path, n_folds=2)
    write_test_folds(tmp_path, n_folds=2)
    run(smoke_cfg)
    written = (tmp_path / "data/predictions/calibrate/test.csv").read_text()
    path = tmp_path / "data/predictions/ensemble/test_folds.csv"
    df = pd.read_csv(path)
    df.loc[200, "c3"] = -1.0  # fold 1's first image: line 202
    df.to_csv(path, index=False)
    with pytest.raises(BadInputError, match=r"test_folds.csv, row 202: img_t0.jpg: probabilities must be finite"):
        run(smoke_cfg)
    assert (tmp_path / "data/predictions/calibrate/test.csv").read_text() == written
    # the command `dvc repro` and the flow run: exit 2, the file and row named, the output kept
    from pipeline.cli import main
    from pipeline.config import write_params

    params = write_params(smoke_cfg, tmp_path / "params.yaml")
    assert main(["calibrate", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "test_folds.csv, row 202: img_t0.jpg" in err and "previous outputs are left in place" in err
    assert (tmp_path / "data/predictions/calibrate/test.csv").read_text() == written
