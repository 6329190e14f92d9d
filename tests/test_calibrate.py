"""calibrate stage: temperature and clip fitted on validation, applied to valid and test alike, with an
honest cross-fitted estimate over validation drivers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

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


def model_outputs(n: int, sharpness: float, seed: int = 0, accuracy: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """Labels and probabilities of a model that is right ``accuracy`` of the time; ``sharpness``
    scales its logits (> 1: over-confident, < 1: under-confident)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    predicted = np.where(rng.random(n) < accuracy, labels, rng.integers(0, 10, n))
    logits = rng.normal(0, 1, (n, 10))
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


def write_inputs(root: Path, n_valid: int = 300, n_test: int = 200) -> None:
    labels, probs = model_outputs(n_valid + n_test, sharpness=3.0, seed=1)
    valid_imgs = [f"img_v{i}.jpg" for i in range(n_valid)]
    test_imgs = [f"img_t{i}.jpg" for i in range(n_test)]
    split = pd.DataFrame({
        "img": valid_imgs + [f"img_tr{i}.jpg" for i in range(20)],
        "subject": [f"p00{i % 3}" for i in range(n_valid)] + ["p009"] * 20,
        "classname": [f"c{c}" for c in labels[:n_valid]] + ["c0"] * 20,
        "split": ["valid"] * n_valid + ["train"] * 20,
        "fold": [-1] * n_valid + [0] * 20,
    })
    (root / "data").mkdir(parents=True, exist_ok=True)
    split.to_csv(root / "data/split.csv", index=False)
    write_predictions(root / "data/predictions/ensemble/valid.csv", valid_imgs, probs[:n_valid])
    write_predictions(root / "data/predictions/ensemble/test.csv", test_imgs, probs[n_valid:])
    (root / "data/hidden").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"img": test_imgs, "classname": [f"c{c}" for c in labels[n_valid:]]}).to_csv(
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
    assert figures["temperature"] > 1 and figures["n_valid_drivers"] == 3
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
    valid_imgs = [f"img_v{i}.jpg" for i in range(200)]
    split = pd.read_csv(tmp_path / "data/split.csv")
    split.loc[:199, "subject"] = ["p001"] * 100 + ["p002"] * 100
    split.loc[:199, "classname"] = [f"c{c}" for c in np.concatenate([labels_a, labels_b])]
    split.to_csv(tmp_path / "data/split.csv", index=False)
    write_predictions(tmp_path / "data/predictions/ensemble/valid.csv", valid_imgs, np.concatenate([over, under]))
    figures = run(smoke_cfg)
    assert figures["valid_logloss_crossfit"] > figures["valid_logloss_before"]
    assert figures["applied"] is False
    assert figures["valid_logloss"] == pytest.approx(figures["valid_logloss_before"])
    assert figures["test_logloss"] == pytest.approx(figures["test_logloss_before"])


def test_stage_refuses_predictions_for_images_outside_validation(smoke_cfg, tmp_path):
    write_inputs(tmp_path)
    path = tmp_path / "data/predictions/ensemble/valid.csv"
    df = pd.read_csv(path)
    df.loc[4, "img"] = "img_tr3.jpg"  # a train image
    df.to_csv(path, index=False)
    with pytest.raises(BadInputError, match=r"valid.csv, row 6: img_tr3.jpg is not a validation image"):
        run(smoke_cfg)


def test_stage_refuses_unusable_probabilities(smoke_cfg, tmp_path):
    write_inputs(tmp_path)
    path = tmp_path / "data/predictions/ensemble/test.csv"
    df = pd.read_csv(path)
    df.loc[2, "c5"] = np.nan
    df.to_csv(path, index=False)
    with pytest.raises(BadInputError, match=r"test.csv, row 4: img_t2.jpg"):
        run(smoke_cfg)


def test_stage_needs_the_ensemble(smoke_cfg):
    with pytest.raises(StageError, match="run the ensemble stage first"):
        run(smoke_cfg)
