"""The pseudo stage: a fixed pseudo-labelled share of every batch (the course's 1/4..1/3), test
images only (never validation), soft/hard/distilled targets, the whole stage end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_finetune import link_inputs, prepared, tiny_cfg  # noqa: F401  (prepared is a fixture)

from pipeline.config import ConfigError, PseudoConfig, load_profile
from pipeline.errors import StageError
from pipeline.io import read_json
from pipeline.metrics import read_predictions, write_predictions
from pipeline.models import input_hw
from pipeline.stages import finetune, pseudo
from pipeline.training import pseudo as pseudo_labels
from pipeline.training.checkpoint import load_network_state
from pipeline.training.classifier import soft_target_loss
from pipeline.training.datamodules import ImageDataModule, MixedBatchSampler, PseudoSet, pseudo_per_batch
from pipeline.training.fine_tuning import build_network
from pipeline.training.head import head_file
from pipeline.training.prediction import FineTuned, tta_predictions
from pipeline.training.tables import ImageTable, read_tables
from pipeline.training.trainer import FitOutcome

# ---------------------------------------------------------------------------- batch composition


@pytest.mark.parametrize(("n_labelled", "n_pseudo", "batch", "fraction"), [
    (30, 16, 8, 0.25), (100, 7, 60, 0.25), (45, 500, 16, 1 / 3), (9, 3, 10, 0.3), (64, 64, 64, 0.25),
])
@pytest.mark.parametrize("world_size", [1, 2])
def test_every_batch_holds_exactly_the_pseudo_count(n_labelled, n_pseudo, batch, fraction, world_size):
    k = pseudo_per_batch(fraction, batch)
    assert k == int(fraction * batch + 0.5)
    copies = 3
    for epoch in range(4):
        seen: list[int] = []
        for rank in range(world_size):
            sampler = MixedBatchSampler(n_labelled, n_pseudo, batch, k, copies, seed=1, rank=rank, world_size=world_size)
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler)
            for b in batches:
                assert len(b) == batch
                assert sum(i >= sampler.pseudo_offset for i in b) == k
                seen += [i for i in b if i < sampler.pseudo_offset]
        copy = epoch % copies
        assert set(seen) == set(range(copy * n_labelled, (copy + 1) * n_labelled))  # every image, this epoch's copy


def test_lesson_seven_mix_is_sixteen_of_sixty():
    assert pseudo_per_batch(0.25, 64) == 16 and pseudo_per_batch(0.25, 60) == 15 and pseudo_per_batch(1 / 3, 48) == 16


def test_data_module_batches_hold_the_exact_pseudo_count(prepared, tmp_path):  # noqa: F811
    cfg = tiny_cfg(link_inputs(prepared, tmp_path))
    tables = read_tables(cfg, use_sample=False)
    test = tables["test"]
    targets = np.full((len(test), 10), 0.1, dtype=np.float32)
    data = ImageDataModule(tables["train"], tables["valid"], (48, 64), cfg.augment, batch_size=8, copies=2,
                           pseudo=PseudoSet(test, targets, fraction=0.25))
    loader = data.train_dataloader()
    counts = [int(batch["pseudo"].sum()) for batch in loader]
    assert counts == [2] * len(loader) and len(loader) == -(-30 // 6)
    batch = next(iter(loader))
    assert batch["input"].dtype == torch.uint8 and batch["input"].shape == (8, 3, 48, 64)
    assert torch.allclose(batch["target"][batch["pseudo"]], torch.full((2, 10), 0.1))
    assert (batch["target"][~batch["pseudo"]].sum(1) == 1).all()  # labelled rows are one-hot


# ---------------------------------------------------------------------------- the fraction rule


@pytest.mark.parametrize("fraction", [0.2, 0.34, 0.5])
def test_fraction_outside_a_quarter_to_a_third_is_rejected(fraction):
    with pytest.raises(ConfigError, match=r"pseudo\.fraction.*between 0\.25 and 1/3 inclusive"):
        load_profile("smoke", {"pseudo.fraction": fraction})
    with pytest.raises(ValueError, match=r"pseudo\.fraction must be between 0\.25 and 1/3"):
        PseudoConfig(fraction=fraction)


@pytest.mark.parametrize("fraction", [0.25, 0.3, 1 / 3])
def test_fraction_from_a_quarter_to_a_third_is_accepted(fraction):
    assert load_profile("smoke", {"pseudo.fraction": fraction}).pseudo.fraction == fraction


def test_label_options_that_do_not_fit_are_rejected():
    with pytest.raises(ConfigError, match="threshold applies to hard labels"):
        load_profile("smoke", {"pseudo.threshold": 0.9})
    with pytest.raises(ConfigError, match="distill learns the teacher's soft targets"):
        load_profile("smoke", {"pseudo.distill": True, "pseudo.labels": "hard"})


# ---------------------------------------------------------------------------- test images only


def tables_for(valid: list[str], test: list[str]) -> dict[str, ImageTable]:
    def table(imgs: list[str], label: int) -> ImageTable:
        return ImageTable(imgs, [f"/x/{i}" for i in imgs], np.full(len(imgs), label))
    return {"train": table(["t1.jpg"], 0), "valid": table(valid, 3), "test": table(test, -1)}


def test_students_train_with_finetunes_settings_and_pseudos_own_epochs_seed_and_learning_rate():
    cfg = load_profile("smoke", ["finetune.schedule=onecycle", "finetune.lr=3e-3", "pseudo.max_epochs=2",
                                 "pseudo.seed=5"])
    inherited = pseudo_labels.student_settings(cfg)
    assert (inherited.schedule, inherited.lr, inherited.seed) == ("onecycle", 3e-3, 5)
    assert inherited.layer_lr_decay == cfg.finetune.layer_lr_decay
    own = pseudo_labels.student_settings(cfg.model_copy(update={"pseudo": cfg.pseudo.model_copy(update={"lr": 3e-4})}))
    assert (own.schedule, own.lr) == ("onecycle", 3e-4)
    with pytest.raises(ConfigError, match="pseudo.lr"):
        load_profile("smoke", ["pseudo.lr=0"])


def test_validation_images_never_reach_the_pseudo_set():
    tables = tables_for(valid=["v1.jpg", "v2.jpg"], test=["x1.jpg", "x2.jpg"])
    probs = np.full((2, 10), 0.1)
    ok = pseudo_labels.make_pseudo_set(tables["test"], probs, PseudoConfig())
    pseudo_labels.check_test_only(ok, tables)  # test images only: fine

    smuggled = ImageTable(["x1.jpg", "v2.jpg"], ["/x/x1.jpg", "/x/v2.jpg"], np.array([-1, -1]))
    with pytest.raises(StageError, match="validation image.*never be pseudo-labels"):
        pseudo_labels.check_test_only(PseudoSet(smuggled, probs.astype(np.float32), 0.25), tables)
    labelled = ImageTable(["x1.jpg", "x2.jpg"], ["/x/x1.jpg", "/x/x2.jpg"], np.array([-1, 4]))
    with pytest.raises(StageError, match="carry true labels"):
        pseudo_labels.check_test_only(PseudoSet(labelled, probs.astype(np.float32), 0.25), tables)


def test_teacher_predictions_with_validation_rows_are_refused(tmp_path):
    tables = tables_for(valid=["v1.jpg"], test=["x1.jpg", "x2.jpg"])
    path = tmp_path / "test.csv"
    write_predictions(path, ["x1.jpg", "x2.jpg", "v1.jpg"], np.full((3, 10), 0.1), [f"c{i}" for i in range(10)])
    with pytest.raises(StageError, match="exactly the 2 test images"):
        pseudo_labels.teacher_test_probs(path, tables["test"])


def test_hard_labels_keep_confident_test_images_only():
    tables = tables_for(valid=["v1.jpg"], test=["x1.jpg", "x2.jpg", "x3.jpg"])
    probs = np.full((3, 10), 0.05)
    probs[0, 2], probs[1, 7], probs[2, 1] = 0.55, 0.3, 0.95
    chosen = pseudo_labels.make_pseudo_set(tables["test"], probs, PseudoConfig(labels="hard", threshold=0.5))
    assert chosen.table.ids == ["x1.jpg", "x3.jpg"]
    assert chosen.targets.argmax(1).tolist() == [2, 1] and (chosen.targets.sum(1) == 1).all()
    with pytest.raises(StageError, match="no test image reaches"):
        pseudo_labels.make_pseudo_set(tables["test"], probs, PseudoConfig(labels="hard", threshold=0.99))


def test_distillation_targets_and_loss():
    probs = np.array([[0.7, 0.2, 0.1] + [0.0] * 7])
    soft = pseudo_labels.temper(probs, 2.0)
    assert soft.sum() == pytest.approx(1) and soft[0, 0] < 0.7 and soft[0, 1] > 0.2  # softer
    np.testing.assert_allclose(pseudo_labels.temper(probs, 1.0)[0, :3], probs[0, :3], rtol=1e-5)

    logits = torch.randn(5, 10)
    labels = torch.tensor([0, 3, 9, 2, 2])
    one_hot = F.one_hot(labels, 10).float()
    torch.testing.assert_close(soft_target_loss(logits, one_hot, torch.ones(5)), F.cross_entropy(logits, labels))
    t = torch.full((5,), 3.0)
    teacher = torch.softmax(torch.randn(5, 10) / 3, 1)
    expected = 9 * -(teacher * F.log_softmax(logits / 3, 1)).sum(1).mean()
    torch.testing.assert_close(soft_target_loss(logits, teacher, t), expected)


# ---------------------------------------------------------------------------- cross pseudo-labelling


def test_image_halves_are_balanced_and_fixed_by_the_ids_not_their_order():
    ids = [f"img_{i}.jpg" for i in range(101)]
    halves = pseudo_labels.image_halves(ids)
    assert set(halves.tolist()) == {0, 1} and abs(int(halves.sum()) - 50) <= 1
    shuffled = list(reversed(ids))
    again = dict(zip(shuffled, pseudo_labels.image_halves(shuffled), strict=True))
    assert all(again[i] == h for i, h in zip(ids, halves, strict=True))
    assert pseudo_labels.image_halves(["a.jpg"]).tolist() == [0] and len(pseudo_labels.image_halves([])) == 0


def test_each_student_learns_one_half_and_predicts_the_other():
    halves = np.array([0, 1, 1, 0, 1])
    assert pseudo_labels.rows_of(halves, 0, taught=True).tolist() == [1, 2, 4]
    assert pseudo_labels.rows_of(halves, 0, taught=False).tolist() == [0, 3]
    assert pseudo_labels.rows_of(halves, None, taught=True).tolist() == pseudo_labels.rows_of(halves, None, taught=False).tolist() == [0, 1, 2, 3, 4]
    assert pseudo_labels.students(PseudoConfig()) == [0, 1] and pseudo_labels.students(PseudoConfig(cross=False)) == [None]


def test_a_student_never_predicts_an_image_it_was_taught():
    tables = tables_for(valid=["v1.jpg"], test=["x1.jpg", "x2.jpg", "x3.jpg"])
    probs = np.full((3, 10), 0.1)
    taught = pseudo_labels.make_pseudo_set(tables["test"].subset(np.array([0, 1])), probs[:2], PseudoConfig())
    pseudo_labels.check_never_taught(taught, tables["test"].subset(np.array([2])))
    with pytest.raises(StageError, match=r"1 test image\(s\) \(e\.g\. x2\.jpg\) would be predicted by the student"):
        pseudo_labels.check_never_taught(taught, tables["test"].subset(np.array([1, 2])))


def test_cross_pseudo_labelling_refuses_halves_it_cannot_fill():
    """Fewer than 2 test images or held-out rows: a clear error naming the switch, before any training."""
    tiny = tables_for(valid=["v1.jpg"], test=["x1.jpg", "x2.jpg"])
    with pytest.raises(StageError, match=r"held-out rows \(1\).*at least 2 of each; set pseudo\.cross=false"):
        pseudo_labels.check_halves([0, 1], tiny)
    pseudo_labels.check_halves([None], tiny)  # one student needs no halves
    pseudo_labels.check_halves([0, 1], tables_for(valid=["v1.jpg", "v2.jpg"], test=["x1.jpg", "x2.jpg"]))


# ---------------------------------------------------------------------------- stage


def test_pseudo_stage_end_to_end_uses_test_images_only(prepared, tmp_path):  # noqa: F811
    """cv mode: fold k's students learn from the test pseudo-labels of finetune@k, a model that never
    saw fold k, and never from another fold's model; the pseudo set holds test images only; each
    student learns one test half and predicts the other (cross pseudo-labelling)."""
    cfg = tiny_cfg(link_inputs(prepared, tmp_path), **{"pseudo.iterations": 2, "pseudo.fraction": 0.25,
                                                          "split.validation": "cv"})
    assert cfg.pseudo.cross  # the default
    with pytest.raises(StageError, match="run the finetune stage first"):
        pseudo.run(cfg, fold=1)
    tuned = finetune.run(cfg)
    figures = pseudo.run(cfg, fold=1)
    assert read_json(cfg.paths.stage_metrics_file("pseudo@1")) == figures
    assert figures["pseudo_per_batch"] == 2 and set(figures["iterations"]) == {"iteration_1", "iteration_2"}
    assert set(figures["iterations"]["iteration_1"]["students"]) == {"half_0", "half_1"}

    split_df = pd.read_csv(cfg.paths.path("split_csv"))
    fold_imgs = set(split_df.loc[split_df["fold"] == 1, "id"])
    assert tuned["finetune@1"]["n_train_images"] == len(split_df) - len(fold_imgs)  # the teacher never saw fold 1
    test_imgs = pd.read_csv(cfg.paths.path("raw") / "test_index.csv")["id"].tolist()
    halves = pseudo_labels.image_halves(test_imgs)
    out = cfg.paths.fold_models("pseudo", 1)
    for iteration in (1, 2):
        taught_by_half = []
        for half in (0, 1):
            labelled_imgs, targets = read_predictions(out / f"iteration_{iteration}" / f"half_{half}" / "pseudo_labels.csv")
            assert labelled_imgs == [i for i, h in zip(test_imgs, halves, strict=True) if h != half]  # the other half only
            assert not set(labelled_imgs) & set(split_df["id"])
            assert np.allclose(targets.sum(1), 1, atol=1e-4)
            taught_by_half.append(set(labelled_imgs))
        assert not taught_by_half[0] & taught_by_half[1] and taught_by_half[0] | taught_by_half[1] == set(test_imgs)
    # iteration 1 learns from fold 1's fine-tuned model's test predictions (soft labels), not fold 0's
    _, teacher = read_predictions(cfg.paths.fold_predictions("finetune", 1) / "test.csv")
    _, other = read_predictions(cfg.paths.fold_predictions("finetune", 0) / "test.csv")
    used = read_predictions(out / "iteration_1" / "half_0" / "pseudo_labels.csv")[1]
    np.testing.assert_allclose(used, teacher[halves == 1], atol=1e-5)
    assert np.abs(used - other[halves == 1]).max() > 1e-4  # 10x the tolerance it matches fold 1's within
    assert (out / "model_half0.pt").exists() and (out / "model_half1.pt").exists() and not (out / "model.pt").exists()
    log = out / "iteration_1" / "half_0" / "logs" / "metrics.csv"
    assert not any(c.startswith("valid/") for c in pd.read_csv(log).columns)
    imgs, _ = read_predictions(cfg.paths.fold_predictions("pseudo", 1) / "oof.csv")
    assert set(imgs) == fold_imgs
    imgs, probs = read_predictions(cfg.paths.fold_predictions("pseudo", 1) / "test.csv")
    assert imgs == test_imgs and np.allclose(probs.sum(1), 1, atol=1e-4)
    # every test and held-out row is predicted by the student of its own half, which never learned it
    tables = read_tables(cfg, False, 1)
    _, oof_probs = read_predictions(cfg.paths.fold_predictions("pseudo", 1) / "oof.csv")
    valid_halves = pseudo_labels.image_halves(tables["valid"].ids)
    for half in (0, 1):
        network, data_cfg, _ = build_network(cfg, head_file(cfg, 1))
        network.load_state_dict(load_network_state(out / f"model_half{half}.pt"))
        student = FineTuned(FitOutcome(network.eval(), {}, torch.device("cpu"), True), input_hw(data_cfg), False, 16, 0, {})
        test_rows, valid_rows = np.flatnonzero(halves == half), np.flatnonzero(valid_halves == half)
        own_valid, own_test, tta = tta_predictions(cfg, student, tables["valid"].subset(valid_rows), tables["test"].subset(test_rows))
        np.testing.assert_allclose(probs[test_rows], own_test, atol=1e-5)
        np.testing.assert_allclose(oof_probs[valid_rows], own_valid, atol=1e-5)
        assert tta["tta_used"] == (cfg.ensemble.tta > 0)  # predicted with test-time augmentation, as finetune

    # one student for everything (pseudo.cross off): the earlier layout replaces the split one
    single = cfg.model_copy(update={"pseudo": cfg.pseudo.model_copy(update={"cross": False, "iterations": 1})})
    figures = pseudo.run(single, fold=1)
    assert sorted(p.name for p in out.iterdir()) == ["iteration_1", "model.pt"]
    labelled_imgs, _ = read_predictions(out / "iteration_1" / "pseudo_labels.csv")
    assert labelled_imgs == test_imgs and figures["cross"] is False
