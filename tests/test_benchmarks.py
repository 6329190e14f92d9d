"""The benchmark scripts run here, at a reduced size, so they still work when someone needs them on a
GPU (benchmarks/full_chain.py) or on real images (benchmarks/real_images.py)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMOKE_SIZE = ["ingest.synthetic.n_train_drivers=6", "ingest.synthetic.train_per_driver=[12, 14]",
              "ingest.synthetic.n_test=20", "ingest.synthetic.width=64", "ingest.synthetic.height=48",
              "model.width_divisor=16", "model.input_size=[48, 64]", "split.n_folds=2", "head.max_epochs=2"]


@pytest.mark.slow
def test_full_chain_times_every_stage_at_a_reduced_size(tmp_path, capsys):
    bench = load("full_chain")
    out = tmp_path / "chain.json"
    argv = ["--size", "reduced", "--workdir", str(tmp_path), "--out", str(out)]
    for override in SMOKE_SIZE:
        argv += ["--set", override]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    stages = {row["stage"]: row for row in result["stages"]}
    assert list(stages) == ["ingest", "split", "pretrain", "features", "head", "finetune", "pseudo", "member", "oof",
                            "ensemble", "calibrate"]
    for name in ("features", "head", "finetune"):
        row = stages[name]
        assert row["seconds"] > 0 and row["images_per_s"] > 0 and row["peak_rss_gb"] > 0.05
        assert row["bound"] in ("GPU", "loader/CPU", "Python/disk", "mixed")
    assert result["total_seconds"] == pytest.approx(sum(r["seconds"] for r in result["stages"]), abs=1)
    assert "| features |" in capsys.readouterr().out


def test_real_image_digits_keep_writers_apart_and_the_hog_baseline_learns(tmp_path):
    bench = load("real_images")
    table = bench.write_competition(tmp_path, seed=0, n_writers=12, n_test_writers=3)
    train, test = table[table["split"] == "train"], table[table["split"] == "test"]
    assert not set(train["subject"]) & set(test["subject"])  # test writers never seen in training
    assert (tmp_path / "imgs/train/c3").is_dir() and len(list((tmp_path / "imgs/test").iterdir())) == len(test)
    listed = (tmp_path / "driver_imgs_list.csv").read_text().splitlines()
    assert listed[0] == "subject,classname,img" and len(listed) == len(train) + 1
    probs = bench.baseline(table, tmp_path, bench.hog)
    labels = test["classname"].map(bench.CLASSES.index).to_numpy()
    assert probs.shape == (len(test), 10) and np.mean(probs.argmax(1) == labels) > 0.5  # chance is 0.1


def test_real_image_photos_keep_strips_apart_and_the_hog_baseline_learns(tmp_path):
    bench = load("real_images")
    table = bench.write_photo_competition(tmp_path, seed=0, n_groups=8, n_test_groups=2, per_class=6)
    train, test = table[table["split"] == "train"], table[table["split"] == "test"]
    assert not set(train["subject"]) & set(test["subject"])  # test groups (strips, casts) never seen in training
    assert len(train) == 6 * 10 * 6 and len(test) == 2 * 10 * 6 and set(table["classname"]) == set(bench.CLASSES)
    assert (tmp_path / "imgs/train/c9").is_dir() and len(list((tmp_path / "imgs/test").iterdir())) == len(test)
    listed = (tmp_path / "driver_imgs_list.csv").read_text().splitlines()
    assert listed[0] == "subject,classname,img" and len(listed) == len(train) + 1
    assert (tmp_path / "sample_submission.csv").read_text().splitlines()[0] == "img," + ",".join(bench.CLASSES)
    probs = bench.baseline(table, tmp_path, bench.hog)
    labels = test["classname"].map(bench.CLASSES.index).to_numpy()
    assert probs.shape == (len(test), 10) and np.mean(probs.argmax(1) == labels) > 0.3  # chance is 0.1


def test_first_epoch_change_is_paired_row_by_row():
    bench = load("first_epoch")
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 400)
    head = rng.dirichlet(np.ones(3), 400)
    same = bench.paired_change(head, head, labels)
    assert same["change"] == 0 and same["z"] == 0 and same["first_epoch"] == same["head"]
    # every row's true-class probability shrunk a little: a small but consistent loss, many SEs out
    shrunk = head.copy()
    shrunk[np.arange(400), labels] *= 0.9
    worse = bench.paired_change(head, shrunk, labels)
    assert 0 < worse["change"] < 0.2 and worse["z"] > 10
    # noise with no direction: some rows better, some worse, the mean change within 2 SE
    noisy = np.clip(head * rng.lognormal(0, 0.05, head.shape), 1e-6, None)
    assert abs(bench.paired_change(head, noisy, labels)["z"]) < 3



def test_submission_estimate_scores_every_candidate_of_a_finished_run_against_its_hidden_labels(tmp_path):
    """A finished run's files (as ensemble_seeds.py and real_images.py keep them): the hidden-test log
    loss is the submission's, each candidate's error is relative to it, the interval brackets the value."""
    from pipeline.ensembling.estimate import METHODS
    from pipeline.io import atomic_write_json
    from pipeline.metrics import kaggle_logloss, write_predictions
    from pipeline.outoffold import write_test_folds

    bench = load("submission_estimate")
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]

    def probs(labels, sharp):
        logits = rng.normal(0, 1, (len(labels), 3))
        logits[np.arange(len(labels)), labels] += sharp
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)

    data = tmp_path / "data"
    labels, folds = rng.integers(0, 3, 120), np.repeat([0, 1], 60)
    ids = [f"i{k}" for k in range(120)]
    (data / "hidden").mkdir(parents=True)
    import pandas as pd

    pd.DataFrame({"id": ids, "label": [classes[k] for k in labels], "group": [f"g{k // 10}" for k in range(120)],
                  "split": "train", "fold": folds}).to_csv(data / "split.csv", index=False)
    write_predictions(data / "predictions/calibrate/oof.csv", ids, probs(labels, 2.0), classes, folds=folds)
    test_labels = rng.integers(0, 3, 40)
    test_ids = [f"t{k}" for k in range(40)]
    per_fold = np.stack([probs(test_labels, 1.5), probs(test_labels, 1.5)])
    write_test_folds(data / "predictions/ensemble/test_folds.csv", test_ids, per_fold, [0, 1], classes)
    write_predictions(data / "predictions/calibrate/test.csv", test_ids, per_fold.mean(axis=0), classes)
    pd.DataFrame({"id": test_ids, "label": [classes[k] for k in test_labels]}).to_csv(data / "hidden/test_labels.csv", index=False)
    atomic_write_json(tmp_path / "reports/stages/calibrate.json", {"temperature": 1.0, "clip_lo": 0.0, "clip_hi": 1.0})

    row = bench.run_figures(tmp_path, None, 0.8)
    assert row["hidden_test"] == pytest.approx(kaggle_logloss(per_fold.mean(axis=0), test_labels))
    assert set(row["candidates"]) == set(METHODS)
    for figures in row["candidates"].values():
        assert figures["low"] < figures["value"] < figures["high"]
        assert figures["error"] == pytest.approx(figures["value"] / row["hidden_test"] - 1)
    assert row["candidates"]["cv_less_gain"]["value"] < row["candidates"]["cv"]["value"]  # averaging disagreeing folds gains
