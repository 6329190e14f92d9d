"""``finetune`` stage: the batchnorm-VGG trained end to end (Lightning), once per fold
(``finetune@<fold>``), starting from that fold's head on top of the same conv base, with staged
unfreezing, lower learning rates for earlier blocks and a low first epoch (see pipeline/training/
for the mechanics). Fold model k trains on the rows outside fold k and predicts fold k (out of fold)
and the test set; in cv mode fold k's rows never steer training (exactly ``finetune.max_epochs``, the
last weights), in holdout mode early stopping and the best checkpoint follow the validation split.

Runs in its own process (the DVC stage command) so that Lightning's DDP launcher can re-execute it
per rank: ``finetune.trainer.devices/num_nodes/strategy`` scale it out. bf16-mixed and channels_last
on GPU, fp32 on CPU (``precision: auto``); ``trainer.compile`` turns on torch.compile.

Outputs
- ``models/finetune/fold<k>/``: ``model.pt`` (``{"state_dict": ConvNet state,
  "meta"}``; ``pipeline.training.fine_tuning.build_network`` + ``load_state_dict`` rebuilds it), ``logs/metrics.csv``, ``tb/``.
- ``data/predictions/folds/finetune/<k>/{oof,test}.csv``: with test-time augmentation (``ensemble.tta``
  augmented passes averaged with the plain one, ``pipeline.training.prediction.tta_predictions``), like every fine-tuned
  CNN of the chain, so the pseudo stage learns from, and is compared with, the model's best predictions;
  and ``reports/stages/finetune@<k>.json``.
- Scratch, outside the outputs: ``.checkpoints/models/finetune/fold<k>/`` (``paths.checkpoints``) holds
  ``last.ckpt`` (a killed run resumes from it; ``best.ckpt`` too in holdout mode) and ``run.json``
  (fingerprint and status).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import Callback

from pipeline.config import Config, item_stage
from pipeline.metrics import OOF_FILE, evaluate, read_hidden_labels, write_predictions, write_stage_metrics
from pipeline.training.checkpoint import MODEL_FILE, save_network
from pipeline.training.fine_tuning import fine_tune, training_figures
from pipeline.training.folds import run_folds
from pipeline.training.prediction import tta_predictions
from pipeline.training.tables import read_tables
from pipeline.training.trainer import quiet_training

STAGE = "finetune"


def run_fold(cfg: Config, fold: int, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Fine-tune fold ``fold`` from its head, predict its held-out rows and the test set, report;
    return the figures (``{}`` on DDP ranks other than 0, which write nothing)."""
    start = time.perf_counter()
    quiet_training()
    tables = read_tables(cfg, cfg.finetune.use_sample, fold)
    out_dir = cfg.paths.fold_models(STAGE, fold)
    fitted = fine_tune(cfg, cfg.finetune, tables, out_dir, fold, callbacks, label=item_stage(STAGE, fold))
    valid_probs, test_probs, tta = tta_predictions(cfg, fitted, tables["valid"], tables["test"])
    if not fitted.outcome.is_global_zero:
        return {}
    classes = fitted.meta["classes"]
    figures: dict[str, Any] = evaluate(valid_probs, tables["valid"].labels, tables["test"].ids, test_probs,
                                       read_hidden_labels(cfg.paths.path("hidden"), classes))
    save_network(out_dir / MODEL_FILE, fitted.outcome.network, {**fitted.meta, "stage": STAGE, "fold": fold})
    pred_dir = cfg.paths.fold_predictions(STAGE, fold)
    write_predictions(pred_dir / OOF_FILE, tables["valid"].ids, valid_probs, classes)
    write_predictions(pred_dir / "test.csv", tables["test"].ids, test_probs, classes)

    figures.update({**tta, **training_figures(fitted, len(tables["train"]))})
    figures.update({"fold": fold, "seconds": round(time.perf_counter() - start, 3)})
    write_stage_metrics(cfg.paths.stage_metrics_file(item_stage(STAGE, fold)), figures)
    return figures


def run(cfg: Config, fold: int | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """One fold (the DVC ``finetune@<fold>`` stages), or every fold of ``split.fold_ids`` in turn."""
    return run_folds(cfg, STAGE, lambda c, f: run_fold(c, f, callbacks), fold)
