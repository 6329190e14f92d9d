"""The submission's estimate (pipeline/ensembling/estimate.py): the candidates, the label-free
confidence shift, and the group-bootstrap interval, which must cover a fresh draw of test groups about
as often as it says."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ensembling.estimate import (
    METHODS,
    confidence_shift,
    estimate_submission,
    expected_test_groups,
    group_interval,
    mean_entropy,
    row_losses,
)
from pipeline.metrics import kaggle_logloss


def predictions(n: int, sharpness: float, rng: np.random.Generator, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), labels] += sharpness
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels


def test_row_losses_average_to_kaggles_log_loss():
    probs, labels = predictions(200, 2.0, np.random.default_rng(0))
    probs[0] = np.eye(10)[(labels[0] + 1) % 10]  # a confident mistake: clipped like Kaggle
    assert row_losses(probs, labels).mean() == pytest.approx(kaggle_logloss(probs, labels), rel=1e-9)


def test_the_confidence_shift_is_positive_when_the_models_are_less_sure_on_test():
    rng = np.random.default_rng(1)
    oof, _ = predictions(300, 3.0, rng)
    folds = np.repeat([0, 1, 2], 100)
    sure = np.stack([predictions(90, 3.0, rng)[0] for _ in range(3)])
    unsure = np.stack([predictions(90, 0.5, rng)[0] for _ in range(3)])
    assert confidence_shift(oof, folds, unsure, [0, 1, 2]) > 0.3
    assert abs(confidence_shift(oof, folds, sure, [0, 1, 2])) < 0.1
    assert mean_entropy(np.full((4, 10), 0.1)) == pytest.approx(np.log(10))


def test_expected_test_groups_follow_the_labelled_rows_per_group():
    groups = np.repeat(np.arange(12), 50)  # 50 rows per group
    assert expected_test_groups(200, groups) == pytest.approx(4.0)
    assert expected_test_groups(10, groups) == 1.0  # at least one


def test_the_interval_widens_with_fewer_test_groups_and_vanishes_when_groups_agree():
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(12), 40)
    losses = rng.gamma(2.0, 0.25, 12)[groups] + rng.normal(0, 0.05, len(groups))
    few = group_interval(losses, groups, 2, 0.8)
    many = group_interval(losses, groups, 40, 0.8)
    assert few[0] < many[0] < 0 < many[1] < few[1]
    flat = group_interval(np.full(len(groups), 0.5), groups, 4, 0.8)
    assert flat == pytest.approx((0.0, 0.0), abs=1e-12)


def test_the_interval_covers_a_fresh_draw_of_test_groups_about_as_often_as_its_level():
    """Groups whose mean losses differ (some drivers are hard): CV on 12 of them, test on 4 others, many
    times; the 80% interval around CV must hold the test's log loss in roughly 80% of the draws."""
    rng = np.random.default_rng(3)
    inside = 0
    trials = 200
    for trial in range(trials):
        difficulty = rng.gamma(2.0, 0.25, 16)
        rows = rng.integers(30, 60, 16)
        groups = np.repeat(np.arange(16), rows)
        losses = difficulty[groups] * rng.exponential(1.0, len(groups))
        train = groups < 12
        cv = losses[train].mean()
        low, high = group_interval(losses[train], groups[train], 4, 0.8, draws=1000, seed=trial)
        inside += cv + low <= losses[~train].mean() <= cv + high
    assert 0.7 * trials <= inside <= 0.95 * trials


def test_estimate_submission_picks_the_configured_candidate_and_centres_the_interval_on_it():
    rng = np.random.default_rng(4)
    oof, labels = predictions(240, 2.0, rng)
    groups, folds = np.repeat(np.arange(8), 30), np.repeat(np.arange(8) % 2, 30)
    test = predictions(100, 2.0, rng)[0]
    per_fold = np.stack([test, test])
    estimates = {m: estimate_submission(oof, labels, groups, folds, test, per_fold, [0, 1], 0.04, m, None, 0.8)
                 for m in METHODS}
    cv = kaggle_logloss(oof, labels)
    assert estimates["cv"].value == pytest.approx(cv)
    assert estimates["cv_less_gain"].value == pytest.approx(cv - 0.04)
    assert estimates["cv_less_half_gain"].value == pytest.approx(cv - 0.02)
    for method, est in estimates.items():
        assert est.method == method and est.low < est.value < est.high
        assert est.high - est.low == pytest.approx(estimates["cv"].high - estimates["cv"].low)
    figures = estimates["cv"].as_figures()
    assert figures["submission_test_groups"] == pytest.approx(100 / 30, abs=0.01)  # test rows / rows per group
    assert all(np.isfinite(v) for v in figures["submission_estimates"].values())


def test_the_interval_never_goes_below_a_log_loss_of_zero():
    rng = np.random.default_rng(5)
    oof, labels = predictions(120, 6.0, rng)
    groups = np.repeat(np.arange(4), 30)
    oof[:30] = np.roll(oof[:30], 1, axis=1)  # one group confidently wrong: a wide spread over groups
    cv = kaggle_logloss(oof, labels)
    est = estimate_submission(oof, labels, groups, groups % 2, oof[:40], None, [0, 1], cv - 0.01, "cv_less_gain", None, 0.8)
    assert est.value == pytest.approx(0.01)
    assert est.low == 0.0 < est.value < est.high  # the bootstrap's lower offset is far below -0.01
