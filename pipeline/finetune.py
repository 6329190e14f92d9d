"""``finetune`` stage: the batchnorm-VGG trained end to end (Lightning), starting from the head
stage's classifier on top of the same conv base, with staged unfreezing, lower learning rates for
earlier blocks and a low first epoch (see pipeline/training.py for the mechanics).

Runs in its own process (the DVC stage command) so that Lightning's DDP launcher can re-execute it
per rank: ``finetune.trainer.devices/num_nodes/strategy`` scale it out. bf16-mixed and channels_last
on GPU, fp32 on CPU (``precision: auto``); ``trainer.compile`` turns on torch.compile.

Outputs
- ``models/finetune/``: ``best.ckpt`` (lowest ``valid/logloss``), ``last.ckpt`` (a killed run resumes
  from it), ``run.json`` (fingerprint and status), ``model.pt`` (``{"state_dict": ConvNet state,
  "meta"}``, the best weights; ``training.build_network`` + ``load_state_dict`` rebuilds it),
  ``logs/metrics.csv`` and ``tb/`` (TensorBoard).
- ``data/predictions/finetune/{valid,test}.csv`` (``img,c0..c9``) and ``reports/stages/finetune.json``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from pipeline import data, models, training
from pipeline.config import Config
from pipeline.metrics import evaluate, read_hidden_labels, write_predictions, write_stage_metrics
from pipeline.models import input_hw
from pipeline.training import (
    MODEL_FILE,
    ClassifierModule,
    ImageDataModule,
    ImageTable,
    build_network,
    fingerprint,
    fit_or_resume,
    head_file,
    predict_probs,
    quiet_training,
    read_tables,
    save_network,
    uses_cuda,
)

STAGE = "finetune"


def finetune_dir(cfg: Config) -> Path:
    return cfg.paths.path("models") / STAGE


def run_fingerprint(cfg: Config, head_path: Path, tables: dict[str, ImageTable]) -> str:
    """What the checkpoints in models/finetune depend on (``trainer.resume`` itself excluded)."""
    settings = {
        "model": cfg.model.model_dump(mode="json"),
        "augment": cfg.augment.model_dump(mode="json"),
        "finetune": cfg.finetune.model_dump(mode="json", exclude={"trainer": {"resume"}}),
        "images": {name: [t.imgs, t.labels.tolist()] for name, t in tables.items() if name != "test"},
    }
    return fingerprint(settings, files=[head_path], modules=[training, data, models, sys.modules[__name__]])


def run(cfg: Config, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Fine-tune from the head stage's weights, predict valid and test with the best checkpoint,
    report; return the figures (``{}`` on DDP ranks other than 0, which write nothing).
    ``callbacks`` are extra Lightning callbacks (tests use one to simulate a kill)."""
    start = time.perf_counter()
    quiet_training()
    ft = cfg.finetune
    L.seed_everything(ft.seed, workers=True, verbose=False)
    tables = read_tables(cfg, ft.use_sample)
    head_path = head_file(cfg)
    network, data_cfg, head_meta = build_network(cfg, head_path)
    target_hw = input_hw(data_cfg)
    cuda = uses_cuda(ft.trainer)
    module = ClassifierModule(network, ft, channels_last=cuda)
    if ft.trainer.compile:
        network.compile()  # in place: state_dict keys stay those of the plain network
    datamodule = ImageDataModule(tables["train"], tables["valid"], target_hw, cfg.augment, ft.batch_size,
                                 ft.num_workers, ft.seed, copies=ft.max_epochs, pin_memory=cuda)
    out_dir = finetune_dir(cfg)
    outcome = fit_or_resume(module, datamodule, ft.trainer, out_dir, ft.max_epochs, ft.patience,
                            run_fingerprint(cfg, head_path, tables), callbacks)

    def predict(table: ImageTable) -> Any:
        return predict_probs(outcome.network, table, target_hw, ft.batch_size * 2, ft.num_workers, outcome.device, cuda)

    valid_probs, test_probs = predict(tables["valid"]), predict(tables["test"])
    if not outcome.is_global_zero:
        return {}
    save_network(out_dir / MODEL_FILE, outcome.network, {**head_meta, "stage": STAGE, "input_size": list(target_hw)})
    pred_dir = cfg.paths.path("predictions") / STAGE
    write_predictions(pred_dir / "valid.csv", tables["valid"].imgs, valid_probs)
    write_predictions(pred_dir / "test.csv", tables["test"].imgs, test_probs)

    figures: dict[str, Any] = evaluate(valid_probs, tables["valid"].labels, tables["test"].imgs, test_probs,
                                       read_hidden_labels(cfg.paths.path("hidden")))
    facts = outcome.facts
    figures.update(facts)
    figures["n_train_images"] = len(tables["train"])
    if facts.get("train_seconds") and facts.get("global_step"):
        samples = facts["global_step"] * ft.batch_size * facts.get("world_size", 1)
        figures["train_images_per_s"] = round(samples / facts["train_seconds"], 1)  # validation time included
    figures["seconds"] = round(time.perf_counter() - start, 3)
    write_stage_metrics(cfg.paths.stage_metrics_file(STAGE), figures)
    return figures


def main() -> None:
    """Run the stage with params.yaml (the same as ``python -m pipeline finetune``)."""
    from pipeline.cli import main as cli_main

    raise SystemExit(cli_main([STAGE]))
