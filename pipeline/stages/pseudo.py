"""``pseudo`` stage: pseudo-labelling on the test set, then retraining with a fixed pseudo-labelled
share of every batch (the fast.ai course: a quarter to a third, e.g. 44 train + 16 pseudo). Once per
fold (``pseudo@<fold>``): fold k's student and its teacher (``finetune@<k>``) never saw fold k, so
fold k's out-of-fold predictions stay honest (its rows reach it neither as labels nor through
pseudo-labels made by a model trained on them).

Pseudo-labels are fold k's fine-tuned model's test predictions (``data/predictions/folds/finetune/<k>/test.csv``),
of test images only; with cross pseudo-labelling (``pseudo.cross``, the default) two students each
learn one test half's pseudo-labels and predict the other half and the held-out rows of that half
(``pipeline.training.pseudo``: the labels, the checks, why cross).

Each iteration (``pseudo.iterations``, default 1) trains on the split's train rows plus the pseudo set,
every batch holding exactly ``round(pseudo.fraction * finetune.batch_size)`` pseudo rows. Teacher
and students predict with test-time augmentation (``pipeline.training.prediction.tta_predictions``,
as finetune does). The retrained students label the test set for the next iteration (from the second
iteration on, a half's labels come from a student that learned the other half's, so the separation
is exact for one iteration only). A student continues from the fine-tuned weights; with
``pseudo.distill`` it restarts from the head-stage network and learns the teacher's probabilities
softened by ``pseudo.temperature`` (Hinton's knowledge distillation, loss scaled by T^2). Optimiser
and trainer settings are ``finetune``'s; epochs are ``pseudo.max_epochs``.

Outputs: ``models/pseudo/fold<k>/iteration_<i>/`` (per student ``half_<h>/`` with cross: checkpoints,
``run.json``, logs, ``pseudo_labels.csv``: the targets it learned), the last iteration's weights
(``models/pseudo/fold<k>/model_half<h>.pt`` per student with cross, else ``model.pt``),
``data/predictions/folds/pseudo/<k>/{oof,test}.csv`` and ``reports/stages/pseudo@<k>.json``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from lightning.pytorch.callbacks import Callback

from pipeline.competition import read_competition
from pipeline.config import Config, item_stage
from pipeline.metrics import OOF_FILE, evaluate, read_hidden_labels, write_predictions, write_stage_metrics
from pipeline.training.checkpoint import MODEL_FILE, load_network_state, save_network
from pipeline.training.folds import run_folds
from pipeline.training.head import head_file
from pipeline.training.pseudo import (
    TEACHER_STAGE,
    check_halves,
    image_halves,
    remove_stale_students,
    student_dir,
    student_model_file,
    students,
    teach_student,
    teacher_test_probs,
)
from pipeline.training.resume import is_launcher_process
from pipeline.training.tables import read_tables
from pipeline.training.trainer import quiet_training

STAGE = "pseudo"


def run_fold(cfg: Config, fold: int, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Pseudo-label the test set with fold ``fold``'s fine-tuned model, retrain, repeat; predict the
    fold's held-out rows and the test set, report; return the figures (``{}`` on DDP ranks other than 0).
    With ``pseudo.cross`` two students each learn one half's pseudo-labels and predict the other half
    (test images and held-out rows alike), so no prediction comes from a student taught that image."""
    start = time.perf_counter()
    quiet_training()
    ft, ps = cfg.finetune, cfg.pseudo
    tables = read_tables(cfg, ft.use_sample, fold)
    head_path = head_file(cfg, fold)
    teacher_path = cfg.paths.fold_predictions(TEACHER_STAGE, fold) / "test.csv"
    finetuned_path = cfg.paths.fold_models(TEACHER_STAGE, fold) / MODEL_FILE
    teacher_probs = teacher_test_probs(teacher_path, tables["test"])
    finetuned_state = load_network_state(finetuned_path, TEACHER_STAGE)
    classes = read_competition(cfg.paths.path("raw")).classes
    hidden = read_hidden_labels(cfg.paths.path("hidden"), classes)
    out_root = cfg.paths.fold_models(STAGE, fold)
    test_halves, valid_halves = image_halves(tables["test"].ids), image_halves(tables["valid"].ids)
    halves = students(ps)
    check_halves(halves, tables)
    states: dict[int | None, dict[str, Any]] = {half: finetuned_state for half in halves}
    if is_launcher_process():
        remove_stale_students(out_root, ps.iterations, halves)
    per_iteration: dict[str, Any] = {}

    for iteration in range(1, ps.iterations + 1):
        valid_probs = np.zeros((len(tables["valid"]), len(classes)), dtype=np.float32)
        test_probs = np.zeros((len(tables["test"]), len(classes)), dtype=np.float32)
        facts: dict[str, Any] = {}
        for half in halves:
            out_dir = student_dir(out_root, iteration, half)
            label = f"{item_stage(STAGE, fold)} iteration {iteration}" + ("" if half is None else f" half {half}")
            student = teach_student(cfg, fold, tables, teacher_probs, (test_halves, valid_halves), half,
                                    None if ps.distill else states[half], out_dir, iteration,
                                    [head_path, finetuned_path], label, callbacks, modules=[sys.modules[__name__]])
            fitted, pseudo, pseudo_count = student.fitted, student.pseudo, student.pseudo_count
            outcome = fitted.outcome
            valid_probs[student.valid_rows], test_probs[student.test_rows] = student.valid_probs, student.test_probs
            if is_launcher_process():
                write_predictions(out_dir / "pseudo_labels.csv", pseudo.table.ids, pseudo.targets, classes)
                facts[out_dir.name] = {**outcome.facts, "n_pseudo_images": len(pseudo.table),
                                       "n_predicted_test_images": len(student.test_rows),
                                       "tta_used": student.tta.get("tta_used", False)}
            states[half] = {k: v.detach().cpu().clone() for k, v in outcome.network.state_dict().items()}
            if outcome.is_global_zero:
                save_network(student_model_file(out_root, half), outcome.network,
                             {**fitted.meta, "stage": STAGE, "iterations": ps.iterations, "fold": fold, "half": half})
        if is_launcher_process():
            per_iteration[f"iteration_{iteration}"] = {
                **evaluate(valid_probs, tables["valid"].labels, tables["test"].ids, test_probs, hidden),
                **(facts[f"iteration_{iteration}"] if halves == [None] else {"students": facts}),
            }
        teacher_probs = test_probs  # the retrained students label the next iteration

    if not outcome.is_global_zero:
        return {}
    pred_dir = cfg.paths.fold_predictions(STAGE, fold)
    figures: dict[str, Any] = evaluate(valid_probs, tables["valid"].labels, tables["test"].ids, test_probs, hidden)
    write_predictions(pred_dir / OOF_FILE, tables["valid"].ids, valid_probs, classes)
    write_predictions(pred_dir / "test.csv", tables["test"].ids, test_probs, classes)
    figures.update({
        "iterations": per_iteration,
        "fraction": ps.fraction,
        "pseudo_per_batch": pseudo_count,
        "batch_size": ft.batch_size,
        "labels": ps.labels,
        "distill": ps.distill,
        "cross": ps.cross,
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
