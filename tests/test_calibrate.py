"""calibrate stage: temperature and clip fitted on validation, applied to valid and test alike, with an
honest cross-fitted estimate over validation drivers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.competition import Competition, write_competition
from pipeline.competitions.statefarm import CLASSES
from pipeline.config import load_profile
from pipeline.errors import BadInputError, StageError
from pipeline.folds import group_folds as driver_folds
from pipeline.metrics import kaggle_logloss, read_predictions, write_predictions
from pipeline.stages.calibrate import (
    Calibration,
    apply_calibration,
    clip_probs,
    cross_fitted_probs,
    fit_calibration,
    fit_clip,
    fit_temperature,
    run,
    temperature_scale,
)


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


def test_cross_fitting_calibrates_each_driver_with_the_others_fit():
    labels, probs = model_outputs(400, sharpness=3.0)
    drivers = np.repeat(["p001", "p002", "p003", "p004"], 100)
    crossed = cross_fitted_probs(probs, labels, drivers, n_folds=2, seed=0)
    assert crossed is not None and np.allclose(crossed.sum(axis=1), 1)
    folds = driver_folds(drivers, 2, 0)
    for fold in (0, 1):
        held = folds == fold
        assert set(drivers[held]).isdisjoint(drivers[~held]) and held.sum() == 200  # whole drivers
        expected = apply_calibration(probs[held], fit_calibration(probs[~held], labels[~held]))
        assert np.allclose(crossed[held], expected)
    assert cross_fitted_probs(probs, labels, np.array(["p001"] * 400)) is None


# ---------------------------------------------------------------------------- the stage


def write_inputs(root: Path, n_valid: int = 300, n_test: int = 200, classes: tuple[str, ...] = CLASSES,
                 has_groups: bool = True) -> None:
    """competition.json, split.csv (id,label,group,split,fold: 20 train rows first, then validation),
    the ensemble's predictions and hidden test labels. Without groups every image is its own group,
    as the split stage writes it."""
    labels, probs = model_outputs(n_valid + n_test, sharpness=3.0, seed=1, k=len(classes))
    valid_ids = [f"img_v{i}.jpg" for i in range(n_valid)]
    test_ids = [f"img_t{i}.jpg" for i in range(n_test)]
    train_ids = [f"img_tr{i}.jpg" for i in range(20)]
    write_competition(root / "data/raw", Competition(classes, "img", has_groups, "subject" if has_groups else "image",
                                                     "folder", "synthetic"))
    split = pd.DataFrame({
        "id": train_ids + valid_ids,
        "label": [classes[0]] * 20 + [classes[c] for c in labels[:n_valid]],
        "group": (["p009"] * 20 + [f"p00{i % 3}" for i in range(n_valid)]) if has_groups else train_ids + valid_ids,
        "split": ["train"] * 20 + ["valid"] * n_valid,
        "fold": [0] * 20 + [-1] * n_valid,
    })
    split.to_csv(root / "data/split.csv", index=False)
    write_predictions(root / "data/predictions/ensemble/valid.csv", valid_ids, probs[:n_valid], classes)
    write_predictions(root / "data/predictions/ensemble/test.csv", test_ids, probs[n_valid:], classes)
    (root / "data/hidden").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": test_ids, "label": [classes[c] for c in labels[n_valid:]]}).to_csv(
        root / "data/hidden/test_labels.csv", index=False)


def test_stage_writes_calibrated_predictions_and_figures(smoke_cfg, tmp_path):
    write_inputs(tmp_path)
    figures = run(smoke_cfg)
    for key in ("valid_logloss", "valid_acc", "test_logloss", "test_acc", "valid_logloss_before",
                "test_logloss_before", "valid_logloss_crossfit", "temperature", "clip_lo", "clip_hi"):
        assert key in figures, key
    assert figures["valid_logloss"] < figures["valid_logloss_before"]
    assert figures["test_logloss"] < figures["test_logloss_before"]  # the fit transfers to unseen rows
    assert figures["valid_logloss"] <= figures["valid_logloss_crossfit"]  # in-sample is the optimistic one
    assert figures["temperature"] > 1 and figures["n_valid_groups"] == 3
    assert json.loads(smoke_cfg.paths.stage_metrics_file("calibrate").read_text()) == figures
    for name in ("valid", "test"):
        imgs, probs = read_predictions(tmp_path / f"data/predictions/calibrate/{name}.csv")
        assert len(imgs) == (300 if name == "valid" else 200)
        assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
        assert probs.max() <= figures["clip_hi"] + 1e-5


def test_stage_switches_off(tmp_path):
    write_inputs(tmp_path)
    cfg = load_profile("smoke", {"calibrate.temperature": False, "calibrate.clip": False}).at(tmp_path)
    figures = run(cfg)
    assert (figures["temperature"], figures["clip_lo"], figures["clip_hi"]) == (1.0, 0.0, 1.0)
    assert figures["valid_logloss"] == pytest.approx(figures["valid_logloss_before"])


def test_stage_keeps_predictions_when_the_fit_does_not_transfer_across_drivers(smoke_cfg, tmp_path):
    """One validation driver over-confident, the other under-confident: a temperature fitted on both
    looks good in-sample, but fitted on one driver it hurts the other, so it is not applied."""
    write_inputs(tmp_path, n_valid=200)
    labels_a, over = model_outputs(100, sharpness=3.0, seed=2)
    labels_b, under = model_outputs(100, sharpness=0.4, seed=3, accuracy=1.0)
    valid_ids = [f"img_v{i}.jpg" for i in range(200)]
    split = pd.read_csv(tmp_path / "data/split.csv")
    split.loc[20:, "group"] = ["p001"] * 100 + ["p002"] * 100
    split.loc[20:, "label"] = [f"c{c}" for c in np.concatenate([labels_a, labels_b])]
    split.to_csv(tmp_path / "data/split.csv", index=False)
    write_predictions(tmp_path / "data/predictions/ensemble/valid.csv", valid_ids, np.concatenate([over, under]),
                      CLASSES)
    figures = run(smoke_cfg)
    assert figures["valid_logloss_crossfit"] > figures["valid_logloss_before"]
    assert figures["applied"] is False
    assert figures["valid_logloss"] == pytest.approx(figures["valid_logloss_before"])
    assert figures["test_logloss"] == pytest.approx(figures["test_logloss_before"])


def test_stage_refuses_predictions_for_images_outside_validation(smoke_cfg, tmp_path):
    write_inputs(tmp_path)
    path = tmp_path / "data/predictions/ensemble/valid.csv"
    df = pd.read_csv(path)
    df.loc[4, "id"] = "img_tr3.jpg"  # a train image
    df.to_csv(path, index=False)
    with pytest.raises(BadInputError, match=r"valid.csv, row 6: img_tr3.jpg is not a validation image"):
        run(smoke_cfg)


def test_stage_refuses_unusable_probabilities(smoke_cfg, tmp_path):
    write_inputs(tmp_path)
    path = tmp_path / "data/predictions/ensemble/test.csv"
    df = pd.read_csv(path)
    df.loc[2, "c5"] = np.nan
    df.to_csv(path, index=False)
    with pytest.raises(BadInputError, match=r"test.csv, row 4: img_t2.jpg: c5 = nan"):
        run(smoke_cfg)


@pytest.mark.parametrize("value", ["-0.1", "inf"])
def test_stage_refuses_a_negative_or_infinite_probability_naming_its_column(smoke_cfg, tmp_path, value):
    write_inputs(tmp_path)
    path = tmp_path / "data/predictions/ensemble/valid.csv"
    df = pd.read_csv(path, dtype=str)
    df.loc[6, "c7"] = value
    df.to_csv(path, index=False)
    with pytest.raises(BadInputError, match=rf"valid.csv, row 8: img_v6.jpg: c7 = {value}"):
        run(smoke_cfg)


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
    """A validation label that is not a class is refused with split.csv's own row, not the prediction's."""
    write_inputs(tmp_path)
    split_csv = tmp_path / "data/split.csv"
    split = pd.read_csv(split_csv)
    split.loc[25, "label"] = "c10"  # img_v5.jpg: row 27 of split.csv, row 7 of valid.csv
    split.to_csv(split_csv, index=False)
    with pytest.raises(BadInputError, match="label 'c10' is not a class") as info:
        run(smoke_cfg)
    assert info.value.file == split_csv and info.value.row == 27


def test_stage_calibrates_a_five_class_problem_without_groups(smoke_cfg, tmp_path):
    """Any competition: string class names from competition.json, per-image validation groups and a clip
    bound of (1 - hi) / (K - 1)."""
    classes = ("cat", "dog", "fox", "owl", "yak")
    write_inputs(tmp_path, classes=classes, has_groups=False)
    figures = run(smoke_cfg)
    assert figures["n_valid_groups"] == 300 and figures["valid_logloss_crossfit"] is not None
    assert figures["clip_hi"] < 1 and figures["clip_lo"] == pytest.approx((1 - figures["clip_hi"]) / 4, abs=1e-6)
    path = tmp_path / "data/predictions/calibrate/test.csv"
    assert path.read_text().splitlines()[0] == "id," + ",".join(classes)
    _, probs = read_predictions(path)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5) and probs.max() <= figures["clip_hi"] + 1e-5


def test_stage_needs_ingest_and_the_ensemble(smoke_cfg, tmp_path):
    with pytest.raises(StageError, match="competition.json not found: run the ingest stage first"):
        run(smoke_cfg)
    write_competition(tmp_path / "data/raw", Competition(CLASSES, "img", True, "subject", "folder", "synthetic"))
    with pytest.raises(StageError, match="run the ensemble stage first"):
        run(smoke_cfg)
