"""Ensemble combination, weight fitting, test-neighbour smoothing (pure functions on constructed
predictions), and one tiny end-to-end run: features -> head -> member@0,1 -> ensemble -> report."""

import json

import numpy as np
import pytest

from pipeline.folds import group_folds as driver_folds
from pipeline.metrics import kaggle_logloss
from pipeline.neighbours import drop_self, nearest_neighbours, neighbour_smoothing
from pipeline.stages.ensemble import combine, cross_fitted, fit_weights, smoothing_decision


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
def test_fitted_ensemble_beats_or_matches_the_best_member(complementary_members, mean):
    members, labels = complementary_members
    weights = fit_weights(members, labels, mean)
    assert weights.min() >= 0 and weights.sum() == pytest.approx(1)
    best_single = min(kaggle_logloss(m, labels) for m in members)
    assert kaggle_logloss(combine(members, weights, mean), labels) < best_single - 0.05


def test_weight_fitting_turns_down_a_useless_member(complementary_members):
    members, labels = complementary_members
    noise = np.random.default_rng(1).dirichlet(np.full(10, 0.3), size=len(labels))  # confident and random
    weights = fit_weights(np.stack([members[0], noise]), labels)
    assert weights[0] > 0.85
    fitted = kaggle_logloss(combine(np.stack([members[0], noise]), weights), labels)
    assert fitted <= kaggle_logloss(members[0], labels) + 1e-9  # never worse than the best member


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
    k, smoothed_valid, by_k = smoothing_decision(probs, labels, features, max_k=5)
    assert list(by_k) == [1, 2, 3, 5] and k == min(by_k, key=by_k.get) and k > 0
    assert np.array_equal(smoothed_valid, neighbour_smoothing(probs, features, k))


def test_smoothing_k_stops_at_the_frames_a_group_has():
    """Groups of 4 near-duplicate frames: 3 neighbours share the label, a 4th or 10th does not."""
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), 4)
    probs = frame_mistakes(labels, rng)
    features = clustered(labels, rng, spread=0.1)  # one tight cluster per group of 4
    k, _, by_k = smoothing_decision(probs, labels, features, max_k=10)
    assert k in (2, 3) and by_k[10] > by_k[k]


def test_smoothing_is_switched_off_when_it_hurts_validation():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 12)
    probs = noisy_predictions(labels, np.full(len(labels), 20.0), rng)  # confident and right
    features = rng.normal(size=(len(labels), 16))  # neighbours unrelated to labels
    k, smoothed, by_k = smoothing_decision(probs, labels, features, max_k=5)
    assert k == 0 and np.array_equal(smoothed, probs)
    assert min(by_k.values()) > kaggle_logloss(probs, labels)
    assert smoothing_decision(probs, labels, features, max_k=0)[0] == 0  # neighbours = 0: off


def test_cross_fitting_holds_out_whole_drivers(complementary_members):
    members, labels = complementary_members
    groups = np.array([f"p{i % 4}" for i in range(len(labels))])
    folds = driver_folds(groups, 2)
    for driver in set(groups):
        assert len(set(folds[groups == driver])) == 1
    assert driver_folds(np.array(["p1"] * 5), 2) is None
    crossfit = cross_fitted(members, labels, groups, "arithmetic", True, 2)
    assert crossfit.shape == members.shape[1:] and np.allclose(crossfit.sum(axis=1), 1)


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ensembled(tmp_path_factory):
    """The smoke chain up to the ensemble with fine-tuned members (tiny: ~100 images at 48x64, one
    fine-tuning epoch per member, 1 TTA pass)."""
    from pipeline.config import load_profile
    from pipeline.stages import ensemble, features, head, ingest, member, split

    cfg = load_profile("smoke", ["head.max_epochs=2"]).at(tmp_path_factory.mktemp("ensemble"))
    for stage in (ingest, split, features, head):
        stage.run(cfg)
    members = member.run(cfg)
    return cfg, members, ensemble.run(cfg)


def train_images_outside_fold(cfg, fold: int) -> int:
    import pandas as pd

    split = pd.read_csv(cfg.paths.path("split_csv"))
    return int(((split["split"] == "train") & (split["fold"] != fold)).sum())


def test_finetuned_members_train_on_their_own_seed_and_drivers(ensembled):
    cfg, members, _ = ensembled
    assert set(members) == {"member@0", "member@1"}
    for m in (0, 1):
        figures = members[f"member@{m}"]
        assert figures["model"] == "finetune" and figures["seed"] == cfg.finetune.seed + 1 + m
        assert figures["held_out_fold"] == m
        assert figures["n_train_images"] == train_images_outside_fold(cfg, m)  # its fold's drivers left out
        assert (cfg.paths.path("models") / "member" / str(m) / "model.pt").exists()
        assert "valid_logloss_tta" in figures and "tta_used" in figures  # smoke: tta=1
        saved = json.loads(cfg.paths.stage_metrics_file(f"member@{m}").read_text())
        assert saved["valid_logloss"] == pytest.approx(figures["valid_logloss"])


def test_ensemble_stage_writes_predictions_and_honest_figures(ensembled):
    from pipeline.metrics import read_predictions

    cfg, _, figures = ensembled
    imgs, probs = read_predictions(cfg.paths.path("predictions") / "ensemble" / "test.csv")
    assert len(imgs) == cfg.ingest.synthetic.n_test and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert set(figures["members"]) == {"member@0", "member@1"}  # no finetune/pseudo predictions here
    assert figures["member_model"] == "finetune" and figures["weights"] == {"member@0": 0.5, "member@1": 0.5}
    # An equal-weight arithmetic mean is never worse than its members on average (log loss is convex),
    # and smoothing is applied only when it lowers validation log loss.
    mean_member = np.mean([m["valid_logloss"] for m in figures["members"].values()])
    assert figures["valid_logloss"] <= mean_member + 1e-6
    for key in ("test_logloss", "valid_logloss_crossfit", "valid_logloss_crossfit_fitted", "valid_logloss_crossfit_equal",
                "smoothing_applied", "smoothing_valid_logloss_before", "smoothing_valid_logloss_after",
                "smoothing_test_logloss_before", "smoothing_test_logloss_after"):
        assert key in figures
    assert figures["valid_logloss_crossfit"] == figures["valid_logloss_crossfit_equal"]  # fit_weights is off
    saved = json.loads(cfg.paths.stage_metrics_file("ensemble").read_text())
    assert saved["smoothing_applied"] == figures["smoothing_applied"]


def linked_inputs(cfg, root):
    """A fresh project at ``root`` sharing ``cfg``'s ingested data, split, features and head."""
    for name in ("raw", "hidden", "split_csv", "features"):
        target = root / getattr(cfg.paths, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(cfg.paths.path(name).resolve())
    return cfg.at(root)


def with_ensemble(cfg, **changes):
    """``cfg`` with ensemble settings changed (a copy: the module's shared config stays as it is)."""
    return cfg.model_copy(update={"ensemble": cfg.ensemble.model_copy(update=changes)})


def test_head_members_ensemble_with_tta_from_the_feature_cache(ensembled, tmp_path):
    from pipeline.stages import ensemble, member

    cfg = with_ensemble(linked_inputs(ensembled[0], tmp_path), member_model="head")
    members = member.run(cfg)
    assert members["member@1"]["seed"] == cfg.head.seed + 2 and members["member@1"]["model"] == "head"
    assert members["member@0"]["n_train_images"] == train_images_outside_fold(cfg, 0)
    assert (cfg.paths.path("models") / "member" / "1" / "head.pt").exists()
    figures = ensemble.run(cfg)
    assert figures["member_model"] == "head"
    assert "valid_logloss_tta" in figures["members"]["member@0"]  # tta=1, computed (the cache has 1 copy)


def test_ensemble_names_a_member_stage_that_has_not_run(ensembled, tmp_path):
    from pipeline.errors import StageError
    from pipeline.stages import ensemble

    cfg = linked_inputs(ensembled[0], tmp_path)  # members 0 and 1 have not run there
    with pytest.raises(StageError, match="run the member@0 stage first"):
        ensemble.run(cfg)


def test_member_rejects_an_id_not_in_the_config(ensembled):
    from pipeline.errors import StageError
    from pipeline.stages import member

    with pytest.raises(StageError, match="not in ensemble.members"):
        member.run(ensembled[0], member=7)


def test_report_renders_every_section_from_the_ensembled_chain(ensembled):
    from pipeline.stages import report

    cfg = ensembled[0]
    report.run(cfg)
    page = cfg.paths.path("report_html").read_text()
    for text in ("Validation predictions: ensemble", "Confusion matrix", "log loss per true class", "reliability diagram",
                 "member/0/logs", "<h3>most uncertain</h3>", "data:image/jpeg;base64,",
                 f"Test-neighbour smoothing (k = {ensembled[2]['smoothing_k']}, the best of 1 to 3 on validation)"):
        assert text in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # opens offline
