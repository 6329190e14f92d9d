"""``finetune`` stage: the batchnorm-VGG trained end to end (Lightning), starting from the head
stage's classifier on top of the same conv base, with staged unfreezing, lower learning rates for
earlier blocks and a low first epoch (see pipeline/training.py for the mechanics).

Runs in its own process (the DVC stage command) so that Lightning's DDP launcher can re-execute it
per rank: ``finetune.trainer.devices/num_nodes/strategy`` scale it out. bf16-mixed and channels_last
on GPU, fp32 on CPU (``precision: auto``); ``trainer.compile`` turns on torch.compile.

Outputs
- ``models/finetune/``: ``best.ckpt`` (lowest ``valid/logloss``), ``last.ckpt`` (a killed run resumes
  from it), ``run.json`` (fingerprint and status), ``model.pt`` (``{"state_dict": ConvNet state,
  "meta"}``, the best weights; ``recipes.build_network`` + ``load_state_dict`` rebuilds it),
  ``logs/metrics.csv`` and ``tb/`` (TensorBoard).
- ``data/predictions/finetune/{valid,test}.csv`` (``img,c0..c9``) and ``reports/stages/finetune.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.callbacks import Callback

from pipeline.config import Config
from pipeline.metrics import evaluate, read_hidden_labels, write_predictions, write_stage_metrics
from pipeline.recipes import fine_tune, training_figures
from pipeline.tables import read_tables
from pipeline.training import MODEL_FILE, quiet_training, save_network

STAGE = "finetune"


def run(cfg: Config, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Fine-tune from the head stage's weights, predict valid and test with the best checkpoint,
    report; return the figures (``{}`` on DDP ranks other than 0, which write nothing).
    ``callbacks`` are extra Lightning callbacks (tests use one to simulate a kill)."""
    start = time.perf_counter()
    quiet_training()
    tables = read_tables(cfg, cfg.finetune.use_sample)
    out_dir = cfg.paths.path("models") / STAGE
    fitted = fine_tune(cfg, cfg.finetune, tables, out_dir, callbacks)
    valid_probs, test_probs = fitted.predict(tables["valid"]), fitted.predict(tables["test"])
    if not fitted.outcome.is_global_zero:
        return {}
    classes = fitted.meta["classes"]
    figures: dict[str, Any] = evaluate(valid_probs, tables["valid"].labels, tables["test"].ids, test_probs,
                                       read_hidden_labels(cfg.paths.path("hidden"), classes))
    save_network(out_dir / MODEL_FILE, fitted.outcome.network, {**fitted.meta, "stage": STAGE})
    pred_dir = cfg.paths.path("predictions") / STAGE
    write_predictions(pred_dir / "valid.csv", tables["valid"].ids, valid_probs, classes)
    write_predictions(pred_dir / "test.csv", tables["test"].ids, test_probs, classes)

    figures.update(training_figures(fitted, len(tables["train"])))
    figures["seconds"] = round(time.perf_counter() - start, 3)
    write_stage_metrics(cfg.paths.stage_metrics_file(STAGE), figures)
    return figures

