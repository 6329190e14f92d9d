"""The pretrain stage: a backbone trained on a separate synthetic domain (never the competition's
images or drivers), loaded by ``create_backbone`` through ``model.weights=pretrain``, whose conv
features separate the competition's classes on held-out drivers better than a random init's."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config import Config, load_profile
from pipeline.errors import StageError
from pipeline.models import create_backbone
from pipeline.probe import labelled_train_rows, transfer_probe
from pipeline.stages import ingest, pretrain
from pipeline.synthetic.drivers import plan_dataset
from pipeline.training.pretrain import pretrain_synthetic_config

# Margins that every measured run clears with room (benchmarks/pretrain_transfer.py on the smoke profile,
# 8 pretraining seeds x 2 float paths; docs/results.md "The pretrain stand-in"): the probe's gain over a
# random init was at least 0.43 and the domain's held-out accuracy at least 0.44.
TRANSFER_MARGIN = 0.25
HOLDOUT_ACC_FLOOR = 0.3


def pretrain_cfg(root, overrides: list[str] | None = None) -> Config:
    return load_profile("smoke", ["model.weights=pretrain", *(overrides or [])]).at(root)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Config, dict]:
    """One pretrain run of the smoke profile, in a project folder that holds no competition data."""
    cfg = pretrain_cfg(tmp_path_factory.mktemp("pretrain"))
    figures = pretrain.run(cfg)
    return cfg, figures


def test_writes_a_backbone_that_create_backbone_loads(pretrained):
    cfg, figures = pretrained
    path = cfg.paths.path("models") / "pretrain" / "backbone.pt"
    assert cfg.model.pretrain_file == path and path.exists()
    assert not (path.parent / pretrain.SKIPPED_FILE).exists()
    saved = torch.load(path, map_location="cpu", weights_only=True)
    loaded = create_backbone(cfg.model).state_dict()
    assert loaded.keys() == saved["state_dict"].keys()
    for name, value in saved["state_dict"].items():
        assert torch.equal(loaded[name], value), name
    random = create_backbone(cfg.model.model_copy(update={"weights": "none"}))
    assert not torch.equal(random.features[0].weight, loaded["features.0.weight"])  # it did train
    assert saved["meta"]["domain"]["seed"] == cfg.pretrain.seed

    written = json.loads(cfg.paths.stage_metrics_file("pretrain").read_text())
    assert written == figures and figures["skipped"] is False
    assert figures["n_train_drivers"] == cfg.pretrain.n_drivers and figures["n_holdout_drivers"] == cfg.pretrain.n_holdout_drivers
    assert figures["holdout_acc"] > HOLDOUT_ACC_FLOOR  # well above chance (0.1) on unseen drivers of its own domain
    assert figures["seconds"] > 0  # recorded; how fast is benchmarks/' business, not a timed test's


def test_never_touches_the_competition_data(pretrained):
    cfg, figures = pretrained
    for name in ("raw", "hidden", "split_csv", "sample", "features"):  # it ran in a folder without them
        assert not cfg.paths.path(name).exists(), name
    assert figures["seed"] == cfg.pretrain.seed != cfg.ingest.synthetic.seed == figures["competition_seed"]
    # Fresh drivers: no pretraining driver shares a look (background, noise, body) with a competition one.
    domain = plan_dataset(pretrain_synthetic_config(cfg))
    competition = plan_dataset(cfg.ingest.synthetic)
    assert not {look.seed for look in domain.looks.values()} & {look.seed for look in competition.looks.values()}


def test_refuses_the_competition_seed(tmp_path):
    cfg = pretrain_cfg(tmp_path, ["pretrain.seed=2016", "ingest.synthetic.seed=2016"])
    with pytest.raises(StageError, match="pretrain.seed"):
        pretrain.run(cfg)
    assert not (tmp_path / "models" / "pretrain" / "backbone.pt").exists()


@pytest.mark.parametrize("profile,weights", [("statefarm", "hub"), ("smoke", "none")])
def test_other_weights_write_the_skipped_marker(tmp_path, profile, weights):
    cfg = load_profile(profile).at(tmp_path)
    assert cfg.model.weights == weights
    out = tmp_path / "models" / "pretrain"
    out.mkdir(parents=True)
    (out / "backbone.pt").write_bytes(b"stale")  # left by an earlier weights=pretrain run
    figures = pretrain.run(cfg)
    assert figures["skipped"] is True and f"model.weights={weights}" in figures["reason"]
    assert sorted(p.name for p in out.iterdir()) == [pretrain.SKIPPED_FILE]
    assert json.loads((out / pretrain.SKIPPED_FILE).read_text())["skipped"] is True
    assert json.loads(cfg.paths.stage_metrics_file("pretrain").read_text()) == figures


def test_the_backbone_file_follows_the_root_and_is_no_param(tmp_path):
    cfg = pretrain_cfg(tmp_path)
    assert cfg.model.pretrain_file == tmp_path / "models" / "pretrain" / "backbone.pt"
    assert cfg.at(tmp_path / "b").model.pretrain_file == tmp_path / "b" / "models" / "pretrain" / "backbone.pt"
    assert "pretrain_file" not in cfg.to_params()["model"]
    with pytest.raises(FileNotFoundError, match="run the pretrain stage"):
        create_backbone(cfg.model)


def test_pretrained_features_separate_the_competition_classes_better(pretrained, tmp_path):
    cfg, _ = pretrained  # cfg.model loads the fixture's backbone
    competition = cfg.at(tmp_path)
    ingest.run(competition)  # the competition's (smoke) drivers, seen only now, after pretraining
    paths, labels, groups = labelled_train_rows(competition.paths.path("raw"))
    random_acc = transfer_probe(cfg.model.model_copy(update={"weights": "none"}), cfg.features.grid, paths, labels, groups)
    pretrained_acc = transfer_probe(cfg.model, cfg.features.grid, paths, labels, groups)
    assert pretrained_acc > random_acc + TRANSFER_MARGIN, (pretrained_acc, random_acc)
