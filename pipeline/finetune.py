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
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from pipeline import data, models, training
from pipeline.config import AugmentConfig, Config, FinetuneConfig
from pipeline.metrics import evaluate, read_hidden_labels, write_predictions, write_stage_metrics
from pipeline.models import input_hw
from pipeline.training import (
    MODEL_FILE,
    ClassifierModule,
    FitOutcome,
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


def run_fingerprint(cfg: Config, ft: FinetuneConfig, head_path: Path, tables: dict[str, ImageTable],
                    modules: Sequence[ModuleType] = ()) -> str:
    """What the checkpoints in a fine-tune's folder depend on (``trainer.resume`` itself excluded)."""
    settings = {
        "model": cfg.model.model_dump(mode="json"),
        "augment": cfg.augment.model_dump(mode="json"),
        "finetune": ft.model_dump(mode="json", exclude={"trainer": {"resume"}}),
        "images": {name: [t.imgs, t.labels.tolist()] for name, t in tables.items() if name != "test"},
    }
    return fingerprint(settings, files=[head_path],
                       modules=[training, data, models, sys.modules[__name__], *modules])


@dataclass
class FineTuned:
    """A fine-tuned network (best checkpoint, eval mode) and how to run it."""

    outcome: FitOutcome
    target_hw: tuple[int, int]
    cuda: bool
    batch_size: int
    num_workers: int
    meta: dict[str, Any]  # the head stage's meta plus input_size

    def predict(self, table: ImageTable, copy: int = 0, augment: AugmentConfig | None = None, seed: int = 0) -> np.ndarray:
        """Probabilities of every row of ``table``: plain, or its augmented copy ``copy`` (TTA)."""
        return predict_probs(self.outcome.network, table, self.target_hw, self.batch_size * 2, self.num_workers,
                             self.outcome.device, self.cuda, copy=copy, augment=augment, seed=seed)


def fine_tune(cfg: Config, ft: FinetuneConfig, tables: dict[str, ImageTable], out_dir: Path,
              callbacks: Sequence[Callback] = (), modules: Sequence[ModuleType] = (), label: str = STAGE) -> FineTuned:
    """Fine-tune from the head stage's weights with the settings ``ft`` on ``tables["train"]``
    (validation: ``tables["valid"]``), checkpoints in ``out_dir``. Used by this stage and by the
    fine-tuned ensemble members (``pipeline.member``), which pass their own seed and train rows."""
    L.seed_everything(ft.seed, workers=True, verbose=False)
    head_path = head_file(cfg)
    network, data_cfg, head_meta = build_network(cfg, head_path)
    target_hw = input_hw(data_cfg)
    cuda = uses_cuda(ft.trainer)
    module = ClassifierModule(network, ft, channels_last=cuda)
    if ft.trainer.compile:
        network.compile()  # in place: state_dict keys stay those of the plain network
    datamodule = ImageDataModule(tables["train"], tables["valid"], target_hw, cfg.augment, ft.batch_size,
                                 ft.num_workers, ft.seed, copies=ft.max_epochs, pin_memory=cuda)
    outcome = fit_or_resume(module, datamodule, ft.trainer, out_dir, ft.max_epochs, ft.patience,
                            run_fingerprint(cfg, ft, head_path, tables, modules), callbacks, label)
    return FineTuned(outcome, target_hw, cuda, ft.batch_size, ft.num_workers,
                     {**head_meta, "input_size": list(target_hw)})


def training_figures(fitted: FineTuned, n_train_images: int) -> dict[str, Any]:
    """Training facts (epochs, best epoch, resumed ...) and throughput."""
    facts = dict(fitted.outcome.facts)
    facts["n_train_images"] = n_train_images
    if facts.get("train_seconds") and facts.get("global_step"):
        samples = facts["global_step"] * fitted.batch_size * facts.get("world_size", 1)
        facts["train_images_per_s"] = round(samples / facts["train_seconds"], 1)  # validation time included
    return facts


def run(cfg: Config, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Fine-tune from the head stage's weights, predict valid and test with the best checkpoint,
    report; return the figures (``{}`` on DDP ranks other than 0, which write nothing).
    ``callbacks`` are extra Lightning callbacks (tests use one to simulate a kill)."""
    start = time.perf_counter()
    quiet_training()
    tables = read_tables(cfg, cfg.finetune.use_sample)
    out_dir = finetune_dir(cfg)
    fitted = fine_tune(cfg, cfg.finetune, tables, out_dir, callbacks)
    valid_probs, test_probs = fitted.predict(tables["valid"]), fitted.predict(tables["test"])
    if not fitted.outcome.is_global_zero:
        return {}
    save_network(out_dir / MODEL_FILE, fitted.outcome.network, {**fitted.meta, "stage": STAGE})
    pred_dir = cfg.paths.path("predictions") / STAGE
    write_predictions(pred_dir / "valid.csv", tables["valid"].imgs, valid_probs)
    write_predictions(pred_dir / "test.csv", tables["test"].imgs, test_probs)

    figures: dict[str, Any] = evaluate(valid_probs, tables["valid"].labels, tables["test"].imgs, test_probs,
                                       read_hidden_labels(cfg.paths.path("hidden")))
    figures.update(training_figures(fitted, len(tables["train"])))
    figures["seconds"] = round(time.perf_counter() - start, 3)
    write_stage_metrics(cfg.paths.stage_metrics_file(STAGE), figures)
    return figures


def main() -> None:
    """Run the stage with params.yaml (the same as ``python -m pipeline finetune``)."""
    from pipeline.cli import main as cli_main

    raise SystemExit(cli_main([STAGE]))
