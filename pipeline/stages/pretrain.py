"""``pretrain`` stage: the CPU stand-in for ImageNet weights.

The real backbone starts from ImageNet weights (``vgg16_bn.tv_in1k``, from the HF hub). The narrow
VGG-16-bn that the CPU demo and the tests use has no published weights, and with a random init its
cached conv features carry no class information across drivers. So with ``model.weights=pretrain``
this stage trains the narrow VGG classifier on a separate synthetic dataset and saves its weights;
``pipeline.models.create_backbone`` then loads them through the same local-file path as
``model.weights=file``.

Honesty. The pretraining dataset is rendered by ``pipeline.synthetic.drivers.generate`` from its own seed
(``pretrain.seed``, which must differ from ``ingest.synthetic.seed``): fresh drivers, looks and
frames, in a temp folder that is deleted afterwards. The stage never reads the competition's files
(``data/raw``, ``data/hidden``, the split or the sample), so no competition image or driver, valid
or test included, is seen before the ``features`` stage. Caveat: the pretraining domain comes from
the same generator with the same ten classes, so it is a closer relative of the task than ImageNet
is of State Farm, and demo scores after pretraining are kinder than ImageNet transfer would be.

Training (``pipeline.training.pretrain``): the backbone's trainable conv base with a dense head, on
augmented copies of the domain's images, AdamW with a one-cycle schedule; the domain's held-out
drivers measure accuracy on unseen drivers.

Outputs (the DVC out is the whole ``models/pretrain`` folder)
- ``backbone.pt``: ``{"state_dict", "head_state_dict", "meta"}``, written atomically. ``state_dict``
  is the whole timm VGG as ``create_backbone`` builds it (timm's file loader reads this key, strict):
  trained ``features``; ``pre_logits`` and ``head.fc`` keep their random init (no stage uses them).
  ``head_state_dict`` is the pretraining classifier's dense head.
- ``skipped.json`` instead, when ``model.weights`` is not ``pretrain`` (hub/file/none: there is
  nothing to pretrain, but DVC needs the out to exist).
- ``reports/stages/pretrain.json``: accuracy on the pretraining domain (train, held-out drivers),
  sizes and seconds.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, pretrain_backbone_file
from pipeline.io import atomic_write_json
from pipeline.metrics import write_stage_metrics
from pipeline.models import input_hw
from pipeline.synthetic.drivers import CLASSES, generate
from pipeline.training.pretrain import (
    check_separate_domain,
    create_pretrain_network,
    evaluate_classifier,
    pretrain_synthetic_config,
    read_domain,
    save_backbone,
    train_classifier,
)
from pipeline.training.trainer import quiet_training

SKIPPED_FILE = "skipped.json"


WEIGHT_SOURCES = {"hub": "the HF hub (model.hub_tag)", "file": "model.weights_file", "none": "a random init"}


def skip(cfg: Config, out_dir: Path, start: float) -> dict[str, Any]:
    source = WEIGHT_SOURCES[cfg.model.weights]
    reason = f"model.weights={cfg.model.weights}: the backbone's weights come from {source}; nothing to pretrain"
    atomic_write_json(out_dir / SKIPPED_FILE, {"skipped": True, "reason": reason})
    figures = {"skipped": True, "reason": reason, "seconds": round(time.perf_counter() - start, 3)}
    write_stage_metrics(cfg.paths.stage_metrics_file("pretrain"), figures)
    return figures


def run(cfg: Config) -> dict[str, Any]:
    """Pretrain the backbone on a separate synthetic domain (``model.weights=pretrain``), or write
    the skipped marker; return the stage figures."""
    start = time.perf_counter()
    out_file = Path(cfg.model.pretrain_file or pretrain_backbone_file(cfg.paths))
    out_dir = out_file.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.model.weights != "pretrain":
        out_file.unlink(missing_ok=True)  # only this run's outcome is left in the folder
        return skip(cfg, out_dir, start)
    check_separate_domain(cfg)
    quiet_training()
    p = cfg.pretrain
    synthetic = pretrain_synthetic_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)  # head init, shuffling: the backbone's init comes from model.init_seed
        network, backbone, data_cfg = create_pretrain_network(cfg)
        target_hw = input_hw(data_cfg)
        # The domain's images and the checkpoints are scratch: only backbone.pt is the stage's output.
        with tempfile.TemporaryDirectory(prefix="pretrain-domain-") as tmp:
            raw_dir, hidden_dir = Path(tmp) / "raw", Path(tmp) / "hidden"
            generated = generate(synthetic, raw_dir, hidden_dir)
            frames = read_domain(raw_dir, hidden_dir)
            train_start = time.perf_counter()
            outcome = train_classifier(network, frames, cfg, target_hw, Path(tmp) / "fit")
            train_seconds = time.perf_counter() - train_start
            holdout = evaluate_classifier(outcome, frames["holdout"], target_hw, p.batch_size, p.num_workers)
    figures: dict[str, Any] = {
        "skipped": False,
        "seed": p.seed,
        "competition_seed": cfg.ingest.synthetic.seed,
        "n_train_images": int(generated["n_train"]),
        "n_train_drivers": p.n_drivers,
        "n_holdout_images": int(generated["n_test"]),
        "n_holdout_drivers": p.n_holdout_drivers,
        "image_size": [synthetic.height, synthetic.width],
        "input_size": list(target_hw),
        "epochs": p.epochs,
        "best_epoch": outcome.facts.get("best_epoch"),
        "holdout_logloss": round(holdout["logloss"], 4),  # unseen drivers of the pretraining domain
        "holdout_acc": round(holdout["acc"], 4),
        "generate_seconds": generated["seconds"],
        "train_seconds": round(train_seconds, 3),
        "train_images_per_s": round(len(frames["train"]) * p.epochs / train_seconds, 1) if train_seconds > 0 else None,
        "device": outcome.device.type,
    }
    meta = {
        "arch": cfg.model.arch,
        "width_divisor": cfg.model.width_divisor,
        "classes": list(CLASSES),
        "trained": "features (conv base); pre_logits and head.fc keep their random init (unused downstream)",
        "classifier": "ConvNet(conv base pooled to grid, dense head): head_state_dict",
        "grid": p.grid,
        "input_size": list(target_hw),
        "mean": [float(m) for m in data_cfg["mean"]],
        "std": [float(s) for s in data_cfg["std"]],
        "domain": synthetic.model_dump(mode="json"),
        **{k: figures[k] for k in ("holdout_logloss", "holdout_acc", "best_epoch")},
    }
    save_backbone(out_file, backbone.cpu(), network.head.cpu(), meta)
    (out_dir / SKIPPED_FILE).unlink(missing_ok=True)  # after the new backbone is in place, never before
    figures["seconds"] = round(time.perf_counter() - start, 3)
    write_stage_metrics(cfg.paths.stage_metrics_file("pretrain"), figures)
    return figures
