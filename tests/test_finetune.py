"""The finetune stage: starts from the head stage's weights, staged unfreezing with layer-wise
learning rates, trains under 2-process CPU DDP. (A killed finetune resuming: tests/test_resume.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy

from pipeline.config import Config, TrainerConfig, load_profile
from pipeline.io import read_json
from pipeline.metrics import read_predictions
from pipeline.models import (
    backbone_blocks,
    create_backbone,
    create_conv_base,
    create_dense_head,
    input_hw,
    resolve_preprocessing,
)
from pipeline.stages import finetune, ingest, split
from pipeline.stages.features import build_meta
from pipeline.synthetic.drivers import CLASSES
from pipeline.training.checkpoint import MODEL_FILE, load_network_state
from pipeline.training.checkpoint import save_network as save_head
from pipeline.training.classifier import ClassifierModule, set_trainable_blocks, trainable_block_count
from pipeline.training.fine_tuning import build_network
from pipeline.training.head import HEAD_FILE, head_meta, load_head
from pipeline.training.optim import TrainSettings, layer_param_groups
from pipeline.training.prediction import FineTuned, predict_probs, tta_predictions
from pipeline.training.tables import read_tables
from pipeline.training.trainer import FitOutcome, build_strategy, resolve_precision

ROOT = Path(__file__).resolve().parent.parent
# Smaller than the smoke profile's dataset: 5 drivers x 10 frames (2 held out), 16 test frames.
TINY = {
    "ingest.synthetic.n_train_drivers": 5,
    "ingest.synthetic.train_per_driver": [10, 10],
    "ingest.synthetic.n_test": 16,
    "finetune.batch_size": 8,
    "split.validation": "holdout",  # one fold model watching a validation split; cv mode: its own test
}


def tiny_cfg(root: Path, **overrides) -> Config:
    return load_profile("smoke", {**TINY, **overrides}).at(root)


def write_head(cfg: Config) -> Path:
    """A head file exactly as the head stage saves it (random weights, non-trivial batchnorm stats)."""
    backbone = create_backbone(cfg.model)
    data_cfg = resolve_preprocessing(backbone, cfg.model)
    conv_base = create_conv_base(backbone, data_cfg, cfg.features.grid)
    torch.manual_seed(0)
    head = create_dense_head(conv_base.out_features, cfg.head.widths, cfg.head.dropout)
    for module in head.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    features_meta = build_meta(cfg, data_cfg, conv_base.channels, conv_base.out_features, {}, CLASSES)
    for fold in (0, 1):  # fold 0: the holdout fold model; 1 too for the cv test
        path = cfg.paths.fold_models("head", fold) / HEAD_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        save_head(path, head, head_meta(cfg, features_meta, conv_base.out_features))
    return cfg.paths.fold_models("head", 0) / HEAD_FILE


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """Ingested synthetic data, its split and a head file: the finetune stage's inputs."""
    root = tmp_path_factory.mktemp("finetune_inputs")
    cfg = tiny_cfg(root)
    ingest.run(cfg)
    split.run(cfg)
    write_head(cfg)
    return root


def link_inputs(prepared: Path, root: Path) -> Path:
    """A fresh project root whose inputs are links to the prepared ones (outputs stay separate)."""
    for rel in ("data/raw", "data/hidden", "data/split.csv", "models/head"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(prepared / rel)
    return root


# ---------------------------------------------------------------------------- unit


def test_finetune_network_starts_as_the_head_stage_classifier(prepared, tmp_path):
    cfg = tiny_cfg(link_inputs(prepared, tmp_path))
    head_path = cfg.paths.fold_models("head", 0) / HEAD_FILE
    network, data_cfg, meta = build_network(cfg, head_path)
    module = ClassifierModule(network, TrainSettings.from_section(cfg.finetune)).eval()

    head, _ = load_head(head_path)
    conv_base = create_conv_base(create_backbone(cfg.model), data_cfg, meta["grid"])
    images = torch.randint(0, 256, (4, 3, *input_hw(data_cfg)), dtype=torch.uint8)
    with torch.no_grad():
        expected = head.eval()(conv_base(images))
        torch.testing.assert_close(module(images), expected, rtol=1e-5, atol=1e-5)
    assert network.head.state_dict().keys() == head.state_dict().keys()
    for key, value in head.state_dict().items():
        assert torch.equal(network.head.state_dict()[key], value)


def test_staged_unfreezing_and_layerwise_learning_rates(prepared, tmp_path):
    cfg = tiny_cfg(link_inputs(prepared, tmp_path), **{"finetune.unfreeze_blocks": 2, "finetune.unfreeze_every": 2})
    network, _, _ = build_network(cfg, cfg.paths.fold_models("head", 0) / HEAD_FILE)
    blocks = backbone_blocks(network.conv_base)
    convs = [sum(isinstance(layer, torch.nn.Conv2d) for layer in b) for b in blocks]
    assert convs == [2, 2, 3, 3, 3]  # VGG-16's 5 conv blocks (timm feature_info stages)
    assert [trainable_block_count(e, TrainSettings.from_section(cfg.finetune), 5) for e in range(8)] == [2, 2, 3, 3, 4, 4, 5, 5]

    set_trainable_blocks(blocks, 2)
    grads = [any(p.requires_grad for layer in b for p in layer.parameters()) for b in blocks]
    assert grads == [False, False, False, True, True]
    assert all(not layer.training for b in blocks[:3] for layer in b)  # frozen batchnorm keeps its statistics

    lr, decay = cfg.finetune.lr, cfg.finetune.layer_lr_decay
    groups = layer_param_groups(network, blocks, lr, decay)
    assert [g["name"] for g in groups] == ["head", "block5", "block4", "block3", "block2", "block1"]
    assert [g["lr"] for g in groups] == pytest.approx([lr * decay**k for k in range(6)])
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))


def test_precision_auto_is_fp32_on_cpu():
    cfg = load_profile("smoke", {"finetune.trainer.precision": "auto", "finetune.trainer.accelerator": "cpu"})
    assert resolve_precision(cfg.finetune.trainer) == "32-true"


@pytest.mark.parametrize(("strategy", "devices", "nodes", "ddp"), [
    ("ddp", 1, 1, True), ("auto", 2, 1, True), ("auto", 1, 2, True), ("auto", 1, 1, False), ("auto", "0,1", 1, True),
])
def test_several_processes_get_ddp_that_tolerates_frozen_blocks(strategy, devices, nodes, ddp):
    trainer_cfg = TrainerConfig(accelerator="cpu", strategy=strategy, devices=devices, num_nodes=nodes)
    built = build_strategy(trainer_cfg)
    assert isinstance(built, DDPStrategy) == ddp
    if ddp:
        assert built._ddp_kwargs["find_unused_parameters"] is True


# ---------------------------------------------------------------------------- stage


def test_finetune_writes_predictions_checkpoints_and_figures(prepared, tmp_path):
    cfg = tiny_cfg(link_inputs(prepared, tmp_path))
    figures = finetune.run(cfg, fold=0)
    assert read_json(cfg.paths.stage_metrics_file("finetune@0")) == figures
    assert {"valid_logloss", "valid_acc", "test_logloss", "test_acc", "global_step"} <= set(figures)

    split_df = pd.read_csv(cfg.paths.path("split_csv"))
    valid_imgs, valid_probs = read_predictions(cfg.paths.fold_predictions("finetune", 0) / "oof.csv")
    assert valid_imgs == split_df.loc[split_df["split"] == "valid", "id"].tolist()
    test_imgs, test_probs = read_predictions(cfg.paths.fold_predictions("finetune", 0) / "test.csv")
    assert len(test_imgs) == 16 and np.allclose(test_probs.sum(1), 1, atol=1e-4)

    out = cfg.paths.fold_models("finetune", 0)
    for name in ("model.pt", "logs/metrics.csv"):
        assert (out / name).exists(), name
    # Checkpoints live outside the (non-persistent) DVC output, so a killed run can resume.
    for name in ("best.ckpt", "last.ckpt", "run.json"):
        assert (cfg.paths.checkpoints_for(out) / name).exists() and not (out / name).exists(), name
    assert any((out / "tb").iterdir())  # TensorBoard events
    log = pd.read_csv(out / "logs" / "metrics.csv")
    assert {"train/loss", "valid/logloss", "valid/acc"} <= set(log.columns)
    assert log["train/lr"].dropna().iloc[0] == pytest.approx(cfg.finetune.first_epoch_lr)


def test_cv_fold_model_trains_on_the_other_folds_and_never_validates_on_its_own(prepared, tmp_path):
    cfg = tiny_cfg(link_inputs(prepared, tmp_path), **{"split.validation": "cv", "finetune.max_epochs": 2,
                                                          "finetune.patience": 1})
    figures = finetune.run(cfg, fold=1)
    split_df = pd.read_csv(cfg.paths.path("split_csv"))
    in_fold = split_df["fold"] == 1
    assert figures["n_train_images"] == int((~in_fold).sum()) and figures["epochs"] == 2
    ids, _ = read_predictions(cfg.paths.fold_predictions("finetune", 1) / "oof.csv")
    assert ids == split_df.loc[in_fold, "id"].tolist()
    out = cfg.paths.fold_models("finetune", 1)
    ckpts = cfg.paths.checkpoints_for(out)
    assert not (ckpts / "best.ckpt").exists() and (ckpts / "last.ckpt").exists()
    assert not any(c.startswith("valid/") for c in pd.read_csv(out / "logs" / "metrics.csv").columns)


DDP_SCRIPT = """
import json, sys
from pipeline.config import load_profile
from pipeline.stages import finetune

if __name__ == "__main__":
    overrides = json.loads(sys.argv[2])
    cfg = load_profile("smoke", overrides).at(sys.argv[1])
    figures = finetune.run(cfg, fold=0)
    if figures:  # rank 0 only
        print("FIGURES " + json.dumps(figures))
"""


def test_two_process_cpu_ddp_trains(prepared, tmp_path):
    root = link_inputs(prepared, tmp_path / "root")
    script = tmp_path / "ddp_finetune.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    overrides = {**TINY, "finetune.trainer.strategy": "ddp", "finetune.trainer.devices": 2,
                 "finetune.trainer.accelerator": "cpu", "finetune.max_epochs": 1}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for var in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(script), str(root), json.dumps(overrides)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.split("FIGURES ", 1)[1].splitlines()[0])
    assert figures["world_size"] == 2
    assert figures["global_step"] == 2  # ceil(30 / 8) = 4 batches shared by 2 ranks
    test_imgs, test_probs = read_predictions(root / "data" / "predictions" / "folds" / "finetune" / "0" / "test.csv")
    assert len(test_imgs) == 16 and np.allclose(test_probs.sum(1), 1, atol=1e-4)


def test_throughput_benchmark_runs_on_cpu(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_throughput", ROOT / "benchmarks" / "train_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "throughput.json"
    argv = ["--arch", "vgg16_bn_narrow", "--width-divisor", "16", "--size", "32", "--batches", "2", "--warmup", "1",
            "--batch-size", "4", "--workers", "0", "--device", "cpu", "--out", str(out)]
    assert bench.main(argv) == 0
    results = read_json(out)
    assert results["loader_train"]["images_per_s"] > 0 and results["eager"]["model_train"]["images_per_s"] > 0
    assert results["eager"]["train_bound"] in ("loader", "model") and "compiled" not in results  # auto: eager on CPU


def test_a_non_vgg_timm_backbone_runs_features_head_and_finetune(prepared, tmp_path):
    """model.arch takes any timm CNN: a small ResNet (random init) through the feature cache, the
    dense head on it and fine-tuning with its timm stages as unfreezing blocks."""
    from pipeline.stages import features, head

    root = tmp_path / "resnet"
    for rel in ("data/raw", "data/hidden", "data/split.csv"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(prepared / rel)
    cfg = tiny_cfg(root, **{"model.arch": "resnet18", "model.input_size": [32, 32], "features.copies": 2,
                            "finetune.unfreeze_blocks": 2, "finetune.max_epochs": 2, "finetune.unfreeze_every": 1})
    cached = features.run(cfg)
    assert cached["feature_dim"] == 512 * cfg.features.grid ** 2
    fitted_head = head.run(cfg, fold=0)
    tuned = finetune.run(cfg, fold=0)
    for figures in (fitted_head, tuned):
        assert np.isfinite(figures["valid_logloss"]) and figures["valid_logloss"] < 5
    log = pd.read_csv(cfg.paths.fold_models("finetune", 0) / "logs" / "metrics.csv")
    assert log["train/trainable_blocks"].dropna().tolist() == [2.0, 3.0]  # staged unfreezing over timm stages


# ---------------------------------------------------------------------------- continuity between stages


@pytest.fixture(scope="module")
def chained(prepared, tmp_path_factory):
    """pretrain -> features -> head@0 -> finetune@0 (one epoch at the low first-epoch learning rate) on
    the tiny data: a head that has learned something (the stand-in weights), so continuity means something."""
    from pipeline.stages import features, head, pretrain

    root = tmp_path_factory.mktemp("chained")
    for rel in ("data/raw", "data/hidden", "data/split.csv"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(prepared / rel)
    cfg = tiny_cfg(root, **{"features.copies": 2, "head.max_epochs": 12, "head.patience": 12, "head.lr": 1e-2,
                            "finetune.max_epochs": 1, "model.weights": "pretrain"})
    pretrain.run(cfg)
    features.run(cfg)
    return cfg, head.run(cfg, fold=0), finetune.run(cfg, fold=0)


# The cached features are fp16 and the fine-tune network computes fp32 on the fly: probabilities agree
# to well under this (measured 2.3e-4 on the demo).
CONTINUITY_ATOL = 1e-3


def test_finetune_at_step_zero_reproduces_the_heads_predictions(chained):
    """The network fine-tuning starts from predicts the validation images as its head did on the
    cached features: fine-tuning starts where the head ended."""
    cfg, _, _ = chained
    network, data_cfg, _ = build_network(cfg, cfg.paths.fold_models("head", 0) / HEAD_FILE)
    tables = read_tables(cfg, False, 0)
    start = predict_probs(network.eval(), tables["valid"], input_hw(data_cfg), 16, 0, torch.device("cpu"), False)
    ids, head_probs = read_predictions(cfg.paths.fold_predictions("head", 0) / "oof.csv")
    assert ids == tables["valid"].ids
    assert np.abs(start - head_probs).max() < CONTINUITY_ATOL


def test_the_low_learning_rate_first_epoch_keeps_validation_where_the_head_left_it(chained):
    """After one epoch at finetune.first_epoch_lr the validation log loss is within 3% of the head's:
    that epoch lets the new optimiser state settle, with the head's dropout and batchnorm in train mode
    (on the demo in holdout mode, 8 seeds of benchmarks/ensemble_seeds.py: -2.2% to +3.9%, within 3% on 6)."""
    _, head_figures, tuned = chained
    assert tuned["valid_logloss_plain"] <= head_figures["valid_logloss"] * 1.03  # the network alone, without TTA


def test_pseudo_at_step_zero_reproduces_the_finetuned_predictions(chained):
    """pseudo's student (without distillation) starts from finetune@k's weights: same predictions."""
    cfg, _, _ = chained
    network, data_cfg, _ = build_network(cfg, cfg.paths.fold_models("head", 0) / HEAD_FILE)
    network.load_state_dict(load_network_state(cfg.paths.fold_models("finetune", 0) / MODEL_FILE, "finetune"))
    tables = read_tables(cfg, False, 0)
    # predicted as the stages predict (with test-time augmentation when configured)
    student = FineTuned(FitOutcome(network.eval(), {}, torch.device("cpu"), True), input_hw(data_cfg), False, 16, 0, {})
    start, _, _ = tta_predictions(cfg, student, tables["valid"], tables["test"])
    _, tuned_probs = read_predictions(cfg.paths.fold_predictions("finetune", 0) / "oof.csv")
    assert np.abs(start - tuned_probs).max() < CONTINUITY_ATOL
