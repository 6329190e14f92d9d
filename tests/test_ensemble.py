"""Ensemble selection on out-of-fold predictions, nested estimates and test-neighbour smoothing
(pure functions on constructed predictions), and one tiny end-to-end cross-validated run:
features -> head@k -> member@m-k -> oof -> ensemble."""

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.chain import combine
from pipeline.ensembling.selection import hill_climb, nested_combination
from pipeline.ensembling.smoothing import (
    drop_self,
    nearest_neighbours,
    neighbour_smoothing,
    smooth_within_folds,
    smoothing_decision,
)
from pipeline.metrics import kaggle_logloss


def noisy_predictions(labels: np.ndarray, strength: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dirichlet noise plus ``strength`` (per row) of mass on the true class."""
    probs = rng.dirichlet(np.ones(10), size=len(labels))
    probs[np.arange(len(labels)), labels] += strength
    return probs / probs.sum(axis=1, keepdims=True)


@pytest.fixture
def complementary_members():
    """Member A is good on classes 0-4 and weak on 5-9, member B the opposite."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 400)
    low = labels < 5
    a = noisy_predictions(labels, np.where(low, 3.0, 0.2), rng)
    b = noisy_predictions(labels, np.where(low, 0.2, 3.0), rng)
    return np.stack([a, b]), labels


@pytest.mark.parametrize("mean", ["arithmetic", "geometric"])
def test_hill_climbing_beats_the_best_member_with_simplex_weights(complementary_members, mean):
    members, labels = complementary_members
    weights = hill_climb(members, labels, steps=20, mean=mean)
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1)
    best_single = min(kaggle_logloss(m, labels) for m in members)
    assert kaggle_logloss(combine(members, weights, mean), labels) < best_single - 0.05


def test_hill_climbing_picks_the_member_that_is_truly_better(complementary_members):
    members, labels = complementary_members
    rng = np.random.default_rng(1)
    good = noisy_predictions(labels, np.full(len(labels), 3.0), rng)
    weak = noisy_predictions(labels, np.full(len(labels), 0.5), rng)
    noise = rng.dirichlet(np.full(10, 0.3), size=len(labels))  # confident and random
    weights = hill_climb(np.stack([weak, noise, good]), labels, steps=25)
    assert weights.argmax() == 2 and weights[2] > 0.6 and weights[1] == 0
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1)
    fitted = kaggle_logloss(combine(np.stack([weak, noise, good]), weights), labels)
    assert fitted <= kaggle_logloss(good, labels) + 1e-9  # never worse than the best member it started from


def test_nested_weights_for_a_fold_never_see_that_fold():
    """Fold 0's rows favour member A, fold 1's member B: the weights each fold is combined with are
    fitted on the other fold, so fold 0 gets B's weights and fold 1 A's."""
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 10, 200)
    folds = np.repeat([0, 1], 100)
    strong_a = np.where(folds == 0, 4.0, 0.1)
    a = noisy_predictions(labels, strong_a, rng)
    b = noisy_predictions(labels, 4.1 - strong_a, rng)
    members = np.stack([a, b])
    combined, per_fold = nested_combination(members, labels, folds, "hill_climb", 10, "arithmetic")
    assert per_fold[0][1] > per_fold[0][0] and per_fold[1][0] > per_fold[1][1]
    for fold, weights in enumerate(per_fold):
        rows = folds == fold
        np.testing.assert_allclose(combined[rows], combine(members[:, rows], np.array(weights)))
    # Scored on the rows it was fitted on, the same selection looks better than it is.
    assert kaggle_logloss(combined, labels) > kaggle_logloss(combine(members, hill_climb(members, labels, 10)), labels)


def test_geometric_mean_is_a_log_linear_pool_and_arithmetic_a_plain_average():
    p = np.array([[[0.5, 0.5, 0.0], [0.6, 0.3, 0.1]],
                  [[0.5, 0.0, 0.5], [0.2, 0.2, 0.6]]])
    w = np.array([0.5, 0.5])
    np.testing.assert_allclose(combine(p, w, "arithmetic"), p.mean(axis=0))
    geometric = combine(p, w, "geometric")
    expected = np.sqrt(p[0, 1] * p[1, 1])
    np.testing.assert_allclose(geometric[1], expected / expected.sum())
    # One member's (near-)zero vetoes a class under the geometric mean, not under the arithmetic one.
    assert geometric[0, 1] < 1e-6 and geometric[0, 2] < 1e-6 and geometric[0, 0] == pytest.approx(1)
    assert combine(p, w, "arithmetic")[0, 1] == pytest.approx(0.25)
    np.testing.assert_allclose(geometric.sum(axis=1), 1)


def test_knn_excludes_the_point_itself_even_among_exact_duplicates():
    rng = np.random.default_rng(0)
    features = np.repeat(rng.normal(size=(5, 8)), 3, axis=0)  # every row has two exact twins
    neighbours = nearest_neighbours(features, k=4)
    assert neighbours.shape == (15, 4)
    assert not (neighbours == np.arange(15)[:, None]).any()
    assert len(set(neighbours[0].tolist())) == 4
    assert nearest_neighbours(features[:3], k=10).shape == (3, 2)  # k is capped at n - 1
    # When ties push a row's own index out of its k + 1 results, the farthest is dropped instead.
    np.testing.assert_array_equal(drop_self(np.array([[1, 2, 3], [1, 0, 2]]), 2), [[1, 2], [0, 2]])


def clustered(labels: np.ndarray, rng: np.random.Generator, spread: float) -> np.ndarray:
    """Features near one centre per class (frames of a clip sit next to each other)."""
    centres = rng.normal(size=(10, 16)) * 5
    return centres[labels] + rng.normal(size=(len(labels), 16)) * spread


def frame_mistakes(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Frame-level mistakes: 30% of frames confidently on a random wrong class, the rest right."""
    wrong = rng.random(len(labels)) < 0.3
    predicted = np.where(wrong, (labels + rng.integers(1, 10, len(labels))) % 10, labels)
    probs = np.full((len(labels), 10), 0.2 / 9)
    probs[np.arange(len(labels)), predicted] = 0.8
    return probs


def test_smoothing_helps_when_neighbours_share_labels():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 12)
    probs = frame_mistakes(labels, rng)
    features = clustered(labels, rng, spread=0.5)
    smoothed = neighbour_smoothing(probs, features, k=5)
    assert kaggle_logloss(smoothed, labels) < kaggle_logloss(probs, labels) - 0.1
    k, by_k = smoothing_decision(probs, labels, features, np.zeros(len(labels), dtype=int), max_k=5)
    assert list(by_k) == [1, 2, 3, 5] and k == min(by_k, key=by_k.get) and k > 0


def test_smoothing_k_stops_at_the_frames_a_group_has():
    """Groups of 4 near-duplicate frames: 3 neighbours share the label, a 4th or 10th does not."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), 4)
    probs = frame_mistakes(labels, rng)
    features = clustered(labels, rng, spread=0.1)  # one tight cluster per group of 4
    k, by_k = smoothing_decision(probs, labels, features, np.zeros(len(labels), dtype=int), max_k=10)
    assert k in (2, 3) and by_k[10] > by_k[k]


def test_smoothing_is_switched_off_when_it_hurts_out_of_fold_log_loss():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 12)
    probs = noisy_predictions(labels, np.full(len(labels), 20.0), rng)  # confident and right
    features = rng.normal(size=(len(labels), 16))  # neighbours unrelated to labels
    k, by_k = smoothing_decision(probs, labels, features, np.zeros(len(labels), dtype=int), max_k=5)
    assert k == 0 and min(by_k.values()) > kaggle_logloss(probs, labels)
    assert smoothing_decision(probs, labels, features, np.zeros(len(labels), dtype=int), max_k=0)[0] == 0  # off


def test_smoothing_stays_within_a_fold_as_test_images_stay_among_test_images():
    """Each row's nearest neighbour is its twin in the other fold; smoothing within folds ignores it."""
    rng = np.random.default_rng(3)
    base = rng.normal(size=(20, 8))
    features = np.concatenate([base, base + 1e-3])
    folds = np.repeat([0, 1], 20)
    probs = rng.dirichlet(np.ones(10), size=40)
    smoothed = smooth_within_folds(probs, features, folds, k=2)
    changed = probs.copy()
    changed[folds == 1] = rng.dirichlet(np.ones(10), size=20)  # fold 1's predictions replaced
    np.testing.assert_allclose(smooth_within_folds(changed, features, folds, k=2)[folds == 0], smoothed[folds == 0])


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ensembled(tmp_path_factory):
    """The smoke chain in cv mode (2 folds) up to the ensemble with the head and two fine-tuned
    members per fold (tiny: ~85 images at 48x64, one fine-tuning epoch, 1 TTA pass)."""
    from pipeline.config import load_profile
    from pipeline.stages import ensemble, features, head, ingest, member, oof, split

    cfg = load_profile("smoke", ["head.max_epochs=2", "ensemble.include=[head]"]).at(tmp_path_factory.mktemp("ensemble"))
    for stage in (ingest, split, features, head):
        stage.run(cfg)
    members = member.run(cfg)
    return cfg, members, oof.run(cfg), ensemble.run(cfg)


def read_split(cfg) -> pd.DataFrame:
    return pd.read_csv(cfg.paths.path("split_csv"), dtype={"id": str})


def test_fold_models_never_train_or_stop_early_on_their_own_fold(ensembled):
    cfg, members, _, _ = ensembled
    split = read_split(cfg)
    assert set(members) == {f"member@{m}-{k}" for m in (0, 1) for k in (0, 1)}
    for m in (0, 1):
        for k in (0, 1):
            figures = members[f"member@{m}-{k}"]
            assert figures["model"] == "finetune" and figures["seed"] == cfg.finetune.seed + 1 + m
            assert figures["n_train_images"] == int((split["fold"] != k).sum())  # every other fold, all of it
            assert figures["epochs"] == cfg.finetune.max_epochs  # no early stopping in cv mode
            folder = cfg.paths.fold_models(f"member{m}", k)
            assert (folder / "model.pt").exists() and not (folder / "best.ckpt").exists()
            log = pd.read_csv(folder / "logs" / "metrics.csv")
            assert not any(c.startswith("valid/") for c in log.columns)  # its fold was never evaluated in training
            held = pd.read_csv(cfg.paths.fold_predictions(f"member{m}", k) / "oof.csv")
            assert set(held["id"]) == set(split.loc[split["fold"] == k, "id"])
            saved = json.loads(cfg.paths.stage_metrics_file(f"member@{m}-{k}").read_text())
            assert saved["valid_logloss"] == pytest.approx(figures["valid_logloss"])


def test_oof_covers_every_labelled_image_exactly_once_with_its_fold(ensembled):
    from pipeline.metrics import read_oof

    cfg, _, gathered, _ = ensembled
    split = read_split(cfg).set_index("id")
    for model in ("head", "member0", "member1"):
        ids, folds, probs = read_oof(cfg.paths.oof_predictions(model) / "oof.csv")
        assert sorted(ids) == sorted(split.index) and len(set(ids)) == len(ids)
        np.testing.assert_array_equal(folds, split.loc[ids, "fold"].to_numpy())
        assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
        figures = gathered["models"][model]
        assert set(figures["folds"]) == {"0", "1"} and "test_logloss" in figures
        assert sum(f["n"] for f in figures["folds"].values()) == len(split)


def test_ensemble_stage_writes_predictions_and_honest_figures(ensembled):
    from pipeline.metrics import read_oof, read_predictions

    cfg, _, gathered, figures = ensembled
    ids, probs = read_predictions(cfg.paths.path("predictions") / "ensemble" / "test.csv")
    assert len(ids) == cfg.ingest.synthetic.n_test and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert set(figures["candidates"]) == {"head", "member0", "member1"}
    assert sum(figures["weights"].values()) == pytest.approx(1) and min(figures["weights"].values()) >= 0
    oof_ids, folds, oof = read_oof(cfg.paths.path("predictions") / "ensemble" / "oof.csv")
    assert len(oof_ids) == gathered["n_oof"]
    # The written rows are the nested ones: never better than the best candidate by construction of
    # the fallback, and their log loss is the reported one.
    labels = read_split(cfg).set_index("id").loc[oof_ids, "label"]
    classes = json.loads((cfg.paths.path("raw") / "competition.json").read_text())["classes"]
    assert kaggle_logloss(oof, labels.map(classes.index).to_numpy()) == pytest.approx(figures["valid_logloss"], abs=1e-5)
    assert figures["valid_logloss"] <= figures["best_model_valid_logloss"] + 1e-9 or figures["smoothing_applied"]
    assert figures["best_model"] == gathered["best_model"]


def test_each_folds_ensemble_alone_on_test_averages_to_the_submitted_predictions(ensembled):
    """Same weights and smoothing for each fold's models alone: with an arithmetic mean (and smoothing
    an average too) the folds' ensembles average to test.csv, and they disagree (something to gain)."""
    from pipeline.metrics import read_predictions
    from pipeline.outoffold import read_test_folds

    cfg, _, _, figures = ensembled
    assert figures["mean"] == "arithmetic"
    folder = cfg.paths.path("predictions") / "ensemble"
    ids, test = read_predictions(folder / "test.csv")
    classes = json.loads((cfg.paths.path("raw") / "competition.json").read_text())["classes"]
    per_fold = read_test_folds(folder / "test_folds.csv", ids, classes, "ensemble")
    assert per_fold.shape == (len(cfg.split.fold_ids), len(ids), len(classes))
    np.testing.assert_allclose(per_fold.mean(axis=0), test, atol=1e-5)
    assert np.abs(per_fold[0] - per_fold[1]).max() > 1e-3


def test_ensemble_names_a_fold_stage_that_has_not_run(ensembled, tmp_path):
    from pipeline.errors import StageError
    from pipeline.stages import oof

    cfg = ensembled[0]
    linked = cfg.at(tmp_path)
    for name in ("raw", "hidden", "split_csv"):
        target = tmp_path / getattr(cfg.paths, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(cfg.paths.path(name).resolve())
    with pytest.raises(StageError, match=r"run the head@0 stage first"):
        oof.run(linked)


def test_member_rejects_an_id_or_fold_not_in_the_config(ensembled):
    from pipeline.errors import StageError
    from pipeline.stages import member

    with pytest.raises(StageError, match="not in ensemble.members"):
        member.run(ensembled[0], member=7)
    with pytest.raises(StageError, match="not one of split.fold_ids"):
        member.run(ensembled[0], member=0, fold=5)
