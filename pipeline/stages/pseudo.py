"""``pseudo`` stage: pseudo-labelling on the test set, then retraining with a fixed pseudo-labelled
share of every batch (the fast.ai course: a quarter to a third; lesson 7 used 44 train + 16 pseudo). Once per
fold (``pseudo@<fold>``): fold k's student and its teacher (``finetune@<k>``) never saw fold k, so
fold k's out-of-fold predictions stay honest (its rows reach it neither as labels nor through
pseudo-labels made by a model trained on them).

Pseudo-labels are fold k's fine-tuned model's test predictions (``data/predictions/folds/finetune/<k>/test.csv``):
soft by default (the teacher's probabilities), or hard (its argmax) optionally only for test images
at least ``pseudo.threshold`` confident. Only test images are ever pseudo-labelled: validation images
and labels never enter the pseudo set (checked before every iteration, ``check_test_only``), so the
validation log loss stays an honest estimate.

Cross pseudo-labelling (``pseudo.cross``, the default): the test set is split in two halves (fixed by
the image ids), and two students each learn one half's pseudo-labels and predict the other half; the
fold's held-out rows are split the same way, so every prediction, out-of-fold or test, comes from a
student that never learned that image's pseudo-label. Without it one student learns every test
image's pseudo-label and then predicts those very images: on the synthetic demo it grew more confident
and less accurate there than its out-of-fold rows showed (8 seeds: worse than finetune on hidden test
on 7, while better out of fold on 8), so its CV figure did not speak for its test predictions.

Each iteration (``pseudo.iterations``, default 1) trains on the split's train rows plus the pseudo set,
every batch holding exactly ``round(pseudo.fraction * finetune.batch_size)`` pseudo rows. Teacher
and students predict with test-time augmentation (``recipes.tta_predictions``, as finetune does). The
retrained students label the test set for the next iteration (from the second iteration on, a half's
labels come from a student that learned the other half's, so the separation is exact for one
iteration only). A student continues from the fine-tuned weights; with ``pseudo.distill`` it restarts
from the head-stage network and learns the teacher's probabilities softened by ``pseudo.temperature``
(Hinton's knowledge distillation, loss scaled by T^2). Optimiser and trainer settings are
``finetune``'s; epochs are ``pseudo.max_epochs``.

Outputs: ``models/pseudo/fold<k>/iteration_<i>/`` (per student ``half_<h>/`` with cross: checkpoints,
``run.json``, logs, ``pseudo_labels.csv``: the targets it learned), the last iteration's weights
(``models/pseudo/fold<k>/model_half<h>.pt`` per student with cross, else ``model.pt``),
``data/predictions/folds/pseudo/<k>/{oof,test}.csv`` and ``reports/stages/pseudo@<k>.json``.
"""

from __future__ import annotations

import shutil
import sys
import time
import zlib
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
from pipeline.recipes import FineTuned, build_network, head_file, monitors_held_out, tta_predictions
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


def remove_stale_students(out_root: Path, iterations: int, halves: list[int | None]) -> None:
    """What an earlier config left: iteration folders beyond ``iterations``, iteration folders laid out
    for the other ``pseudo.cross`` setting, and weights of students that no longer exist."""
    for folder in out_root.glob("iteration_*"):
        suffix = folder.name.removeprefix("iteration_")
        if not (folder.is_dir() and suffix.isdigit()):
            continue
        split_layout = any(folder.glob("half_*"))
        if int(suffix) > iterations or split_layout != (halves != [None]):
            shutil.rmtree(folder)
    kept = {student_model_file(out_root, half) for half in halves}
    for weights in out_root.glob("model*.pt"):
        if weights not in kept:
            weights.unlink()


def image_halves(ids: Sequence[str]) -> np.ndarray:
    """0 or 1 per image: a balanced split fixed by the ids alone, not by their order (ids sorted by a
    hash of the id, then alternated), so a re-ordered test index keeps every image in its half."""
    order = sorted(range(len(ids)), key=lambda i: (zlib.crc32(ids[i].encode()), ids[i]))
    halves = np.empty(len(ids), dtype=np.int64)
    halves[order] = np.arange(len(ids)) % 2
    return halves


def students(ps: PseudoConfig) -> list[int | None]:
    """Cross pseudo-labelling trains one student per test half; otherwise one student for everything."""
    return [0, 1] if ps.cross else [None]


def rows_of(halves: np.ndarray, half: int | None, taught: bool) -> np.ndarray:
    """The rows a student learns pseudo-labels from (``taught``: the other half) or predicts (its own)."""
    if half is None:
        return np.arange(len(halves))
    return np.flatnonzero((halves != half) if taught else (halves == half))


def check_never_taught(pseudo: PseudoSet, predicted: ImageTable) -> None:
    """Cross pseudo-labelling: a student never predicts a test image whose pseudo-label it learned, so
    its test predictions are as unseen as its out-of-fold ones (the CV figure then speaks for them)."""
    taught = sorted(set(pseudo.table.ids) & set(predicted.ids))
    if taught:
        raise StageError(f"{len(taught)} test image(s) (e.g. {taught[0]}) would be predicted by the student that "
                         "learned their pseudo-labels")


def check_halves(halves: list[int | None], tables: dict[str, ImageTable]) -> None:
    """Cross pseudo-labelling needs something in every half: two test images and two held-out rows."""
    if halves != [None] and min(len(tables["test"]), len(tables["valid"])) < 2:
        raise StageError(f"pseudo.cross splits the test images ({len(tables['test'])}) and the held-out rows "
                         f"({len(tables['valid'])}) in two halves: it needs at least 2 of each; set pseudo.cross=false")


def student_dir(out_root: Path, iteration: int, half: int | None) -> Path:
    folder = out_root / f"iteration_{iteration}"
    return folder if half is None else folder / f"half_{half}"


def student_model_file(out_root: Path, half: int | None) -> Path:
    return out_root / (MODEL_FILE if half is None else f"model_half{half}.pt")


def student_settings(cfg: Config) -> TrainSettings:
    """``finetune``'s optimiser and schedule, with pseudo's seed, epochs and (when set) learning rate."""
    ps = cfg.pseudo
    changes = {"seed": ps.seed, "max_epochs": ps.max_epochs} | ({"lr": ps.lr} if ps.lr is not None else {})
    return TrainSettings.from_section(cfg.finetune.model_copy(update=changes))


def train_student(cfg: Config, fold: int, tables: dict[str, ImageTable], pseudo: PseudoSet,
                  state: dict[str, Any] | None, out_dir: Path, run_fp: str, label: str,
                  callbacks: Sequence[Callback]) -> tuple[FineTuned, int]:
    """One student: the head-stage network (with ``state`` loaded: the fine-tuned weights or the previous
    iteration's), trained on the train rows plus ``pseudo`` with ``finetune``'s settings for
    ``pseudo.max_epochs``; the held-out rows steer it in holdout mode only. (It, the pseudo rows per batch.)"""
    ft, ps = cfg.finetune, cfg.pseudo
    network, data_cfg, head_meta = build_network(cfg, head_file(cfg, fold))
    if state is not None:
        network.load_state_dict(state)
    target_hw, cuda, monitor = input_hw(data_cfg), uses_cuda(ft.trainer), monitors_held_out(cfg)
    module = ClassifierModule(network, student_settings(cfg), models.backbone_blocks(network.conv_base), channels_last=cuda)
    if ft.trainer.compile:
        network.compile()
    watched = tables["valid"] if monitor else tables["valid"].subset(np.array([], dtype=np.int64))
    datamodule = ImageDataModule(tables["train"], watched, target_hw, cfg.augment, ft.batch_size, ft.num_workers,
                                 ps.seed, copies=ps.max_epochs, pseudo=pseudo, pin_memory=cuda,
                                 n_classes=int(head_meta["num_classes"]))
    outcome = fit_or_resume(module, datamodule, ft.trainer, out_dir, ps.max_epochs, ft.patience, run_fp, callbacks,
                            label=label, monitor=monitor, ckpt_dir=cfg.paths.checkpoints_for(out_dir))
    return FineTuned(outcome, target_hw, cuda, ft.batch_size, ft.num_workers, head_meta), datamodule.pseudo_count


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
            L.seed_everything(ps.seed, workers=True, verbose=False)
            taught = rows_of(test_halves, half, taught=True)
            pseudo = make_pseudo_set(tables["test"].subset(taught), teacher_probs[taught], ps)
            check_test_only(pseudo, tables)
            predicted_test, predicted_valid = rows_of(test_halves, half, taught=False), rows_of(valid_halves, half, taught=False)
            if half is not None:
                check_never_taught(pseudo, tables["test"].subset(predicted_test))
            out_dir = student_dir(out_root, iteration, half)
            label = f"{item_stage(STAGE, fold)} iteration {iteration}" + ("" if half is None else f" half {half}")
            fitted, pseudo_count = train_student(cfg, fold, tables, pseudo, None if ps.distill else states[half], out_dir,
                                                 iteration_fingerprint(cfg, iteration, pseudo, [head_path, finetuned_path], tables),
                                                 label, callbacks)
            outcome = fitted.outcome
            valid_probs[predicted_valid], test_probs[predicted_test], tta = tta_predictions(
                cfg, fitted, tables["valid"].subset(predicted_valid), tables["test"].subset(predicted_test))
            if is_launcher_process():
                write_predictions(out_dir / "pseudo_labels.csv", pseudo.table.ids, pseudo.targets, classes)
                facts[out_dir.name] = {**outcome.facts, "n_pseudo_images": len(pseudo.table),
                                       "n_predicted_test_images": len(predicted_test), "tta_used": tta.get("tta_used", False)}
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
