"""``pseudo`` stage: pseudo-labelling on the test set, then retraining with a fixed pseudo-labelled
share of every batch (the course: a quarter to a third; lesson 7 used 44 train + 16 pseudo). Once per
fold (``pseudo@<fold>``): fold k's student and its teacher (``finetune@<k>``) never saw fold k, so
fold k's out-of-fold predictions stay honest (its rows reach it neither as labels nor through
pseudo-labels made by a model trained on them).

Pseudo-labels are fold k's fine-tuned model's test predictions (``data/predictions/folds/finetune/<k>/test.csv``):
soft by default (the teacher's probabilities), or hard (its argmax) optionally only for test images
at least ``pseudo.threshold`` confident. Only test images are ever pseudo-labelled: validation images
and labels never enter the pseudo set (checked before every iteration, ``check_test_only``), so the
validation log loss stays an honest estimate.

Each iteration (``pseudo.iterations``, default 1) trains on the split's train rows plus the pseudo set,
every batch holding exactly ``round(pseudo.fraction * finetune.batch_size)`` pseudo rows; the
retrained model then labels the test set for the next iteration. The student continues from the
fine-tuned weights; with ``pseudo.distill`` it restarts from the head-stage network and learns the
teacher's probabilities softened by ``pseudo.temperature`` (Hinton's knowledge distillation, loss
scaled by T^2). Optimiser and trainer settings are ``finetune``'s; epochs are ``pseudo.max_epochs``.

Outputs: ``models/pseudo/fold<k>/iteration_<i>/`` (checkpoints, ``run.json``, logs,
``pseudo_labels.csv``: the targets used), ``models/pseudo/fold<k>/model.pt`` (the last iteration's
weights), ``data/predictions/folds/pseudo/<k>/{oof,test}.csv`` and ``reports/stages/pseudo@<k>.json``.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from pipeline import data, datamodules, models, recipes, training
from pipeline import tables as image_tables
from pipeline.competition import read_competition
from pipeline.config import Config, PseudoConfig, item_stage
from pipeline.datamodules import ImageDataModule, PseudoSet
from pipeline.errors import StageError
from pipeline.metrics import (
    OOF_FILE,
    evaluate,
    read_hidden_labels,
    read_predictions,
    write_predictions,
    write_stage_metrics,
)
from pipeline.models import input_hw
from pipeline.recipes import build_network, head_file, monitors_held_out
from pipeline.stagefolds import run_folds
from pipeline.tables import ImageTable, one_hot, read_tables
from pipeline.training import (
    MODEL_FILE,
    ClassifierModule,
    TrainSettings,
    fingerprint,
    fit_or_resume,
    is_launcher_process,
    load_network_state,
    predict_probs,
    quiet_training,
    save_network,
    uses_cuda,
)

STAGE = "pseudo"
TEACHER_STAGE = "finetune"


# ---------------------------------------------------------------------------- pseudo-labels


def teacher_test_probs(path: Path, test: ImageTable) -> np.ndarray:
    """The teacher's test predictions in the test table's order (every test image, nothing else)."""
    if not path.exists():
        raise StageError(f"{path} not found: run the {TEACHER_STAGE} stage first")
    ids, probs = read_predictions(path)
    position = {image_id: i for i, image_id in enumerate(ids)}
    if len(position) != len(ids) or set(position) != set(test.ids):
        raise StageError(f"{path}: predictions must cover exactly the {len(test)} test images")
    return probs[[position[image_id] for image_id in test.ids]]


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p) / T)``: the teacher's distribution at temperature T (T=1 leaves it as is)."""
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return (out / out.sum(axis=1, keepdims=True)).astype(np.float32)


def make_pseudo_set(test: ImageTable, teacher_probs: np.ndarray, pseudo_cfg: PseudoConfig) -> PseudoSet:
    """Targets for test images: soft (tempered when distilling), or hard (argmax) above a threshold."""
    if pseudo_cfg.labels == "hard":
        confident = teacher_probs.max(axis=1) >= (pseudo_cfg.threshold or 0.0)
        if not confident.any():
            raise StageError(f"no test image reaches pseudo.threshold={pseudo_cfg.threshold}: lower it")
        rows = np.flatnonzero(confident)
        return PseudoSet(test.subset(rows), one_hot(teacher_probs[rows].argmax(axis=1), teacher_probs.shape[1]), pseudo_cfg.fraction)
    temperature = pseudo_cfg.temperature if pseudo_cfg.distill else 1.0
    return PseudoSet(test, temper(teacher_probs, temperature), pseudo_cfg.fraction, temperature)


def check_test_only(pseudo: PseudoSet, tables: dict[str, ImageTable]) -> None:
    """The pseudo set holds test images only: never a validation image or label (that would make the
    validation score a lie), nor a train image; and it carries no true label."""
    imgs = set(pseudo.table.ids)
    leaked = sorted(imgs & set(tables["valid"].ids))
    if leaked:
        raise StageError(f"{len(leaked)} validation image(s) in the pseudo-labelled set (e.g. {leaked[0]}): "
                         "validation images and labels must never be pseudo-labels")
    not_test = sorted(imgs - set(tables["test"].ids))
    if not_test:
        raise StageError(f"{len(not_test)} pseudo-labelled image(s) are not test images (e.g. {not_test[0]})")
    if (pseudo.table.labels >= 0).any():
        raise StageError("pseudo-labelled rows carry true labels: only test images (label -1) may be pseudo-labelled")


# ---------------------------------------------------------------------------- per_iteration


def iteration_fingerprint(cfg: Config, iteration: int, pseudo: PseudoSet, inputs: list[Path],
                      tables: dict[str, ImageTable]) -> str:
    settings = {
        "iteration": iteration,
        "model": cfg.model.model_dump(mode="json"),
        "augment": cfg.augment.model_dump(mode="json"),
        "finetune": cfg.finetune.model_dump(mode="json", exclude={"trainer": {"resume"}}),
        "pseudo": cfg.pseudo.model_dump(mode="json", exclude={"iterations"}),
        "images": [tables["train"].ids, tables["valid"].ids, pseudo.table.ids],
        "validation": cfg.split.validation,
    }
    return fingerprint(settings, files=inputs, modules=[training, datamodules, recipes, image_tables, data, models, sys.modules[__name__]],
                       arrays=[pseudo.targets])


def remove_stale_iterations(out_root: Path, iterations: int) -> None:
    """Iteration folders beyond ``iterations`` belong to an earlier config: drop them."""
    for folder in out_root.glob("iteration_*"):
        suffix = folder.name.removeprefix("iteration_")
        if folder.is_dir() and suffix.isdigit() and int(suffix) > iterations:
            shutil.rmtree(folder)


def run_fold(cfg: Config, fold: int, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Pseudo-label the test set with fold ``fold``'s fine-tuned model, retrain, repeat; predict the
    fold's held-out rows and the test set, report; return the figures (``{}`` on DDP ranks other than 0)."""
    start = time.perf_counter()
    quiet_training()
    ft, ps = cfg.finetune, cfg.pseudo
    settings = ft.model_copy(update={"seed": ps.seed, "max_epochs": ps.max_epochs})
    L.seed_everything(ps.seed, workers=True, verbose=False)
    tables = read_tables(cfg, ft.use_sample, fold)
    head_path = head_file(cfg, fold)
    teacher_path = cfg.paths.fold_predictions(TEACHER_STAGE, fold) / "test.csv"
    finetuned_path = cfg.paths.fold_models(TEACHER_STAGE, fold) / MODEL_FILE
    teacher_probs = teacher_test_probs(teacher_path, tables["test"])
    student_state = load_network_state(finetuned_path, TEACHER_STAGE)
    cuda = uses_cuda(ft.trainer)
    classes = read_competition(cfg.paths.path("raw")).classes
    hidden = read_hidden_labels(cfg.paths.path("hidden"), classes)
    out_root = cfg.paths.fold_models(STAGE, fold)
    monitor = monitors_held_out(cfg)
    watched = tables["valid"] if monitor else tables["valid"].subset(np.array([], dtype=np.int64))
    if is_launcher_process():
        remove_stale_iterations(out_root, ps.iterations)
    per_iteration: dict[str, Any] = {}

    for iteration in range(1, ps.iterations + 1):
        pseudo = make_pseudo_set(tables["test"], teacher_probs, ps)
        check_test_only(pseudo, tables)
        network, data_cfg, head_meta = build_network(cfg, head_path)
        if not ps.distill:
            network.load_state_dict(student_state)
        target_hw = input_hw(data_cfg)
        module = ClassifierModule(network, TrainSettings.from_section(settings), models.backbone_blocks(network.conv_base),
                                  channels_last=cuda)
        if ft.trainer.compile:
            network.compile()
        datamodule = ImageDataModule(tables["train"], watched, target_hw, cfg.augment, ft.batch_size,
                                     ft.num_workers, ps.seed, copies=ps.max_epochs, pseudo=pseudo, pin_memory=cuda,
                                     n_classes=len(classes))
        out_dir = out_root / f"iteration_{iteration}"
        run_fp = iteration_fingerprint(cfg, iteration, pseudo, [head_path, finetuned_path], tables)
        outcome = fit_or_resume(module, datamodule, ft.trainer, out_dir, ps.max_epochs, ft.patience, run_fp, callbacks,
                                label=f"{item_stage(STAGE, fold)} iteration {iteration}", monitor=monitor,
                                ckpt_dir=cfg.paths.checkpoints_for(out_dir))
        valid_probs, test_probs = (predict_probs(outcome.network, tables[s], target_hw, ft.batch_size * 2, ft.num_workers,
                                                 outcome.device, cuda) for s in ("valid", "test"))
        if is_launcher_process():
            write_predictions(out_dir / "pseudo_labels.csv", pseudo.table.ids, pseudo.targets, classes)
            per_iteration[f"iteration_{iteration}"] = {
                **evaluate(valid_probs, tables["valid"].labels, tables["test"].ids, test_probs, hidden),
                **outcome.facts, "n_pseudo_images": len(pseudo.table),
            }
        teacher_probs = test_probs  # the retrained model labels the next iteration
        student_state = {k: v.detach().cpu().clone() for k, v in outcome.network.state_dict().items()}

    if not outcome.is_global_zero:
        return {}
    save_network(out_root / MODEL_FILE, outcome.network, {**head_meta, "stage": STAGE, "iterations": ps.iterations,
                                                          "fold": fold})
    pred_dir = cfg.paths.fold_predictions(STAGE, fold)
    figures: dict[str, Any] = evaluate(valid_probs, tables["valid"].labels, tables["test"].ids, test_probs, hidden)
    write_predictions(pred_dir / OOF_FILE, tables["valid"].ids, valid_probs, classes)
    write_predictions(pred_dir / "test.csv", tables["test"].ids, test_probs, classes)
    figures.update({
        "iterations": per_iteration,
        "fraction": ps.fraction,
        "pseudo_per_batch": datamodule.pseudo_count,
        "batch_size": ft.batch_size,
        "labels": ps.labels,
        "distill": ps.distill,
        "n_train_images": len(tables["train"]),
        "n_pseudo_images": len(pseudo.table),
        "fold": fold,
        "seconds": round(time.perf_counter() - start, 3),
    })
    write_stage_metrics(cfg.paths.stage_metrics_file(item_stage(STAGE, fold)), figures)
    return figures


def run(cfg: Config, fold: int | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """One fold (the DVC ``pseudo@<fold>`` stages), or every fold of ``split.fold_ids`` in turn."""
    return run_folds(cfg, STAGE, lambda c, f: run_fold(c, f, callbacks), fold)
