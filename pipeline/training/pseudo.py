"""Pseudo-labelling (the ``pseudo`` stage): pseudo-labels from a teacher's test predictions, the
students that learn them, cross pseudo-labelling's test halves.

Pseudo-labels are soft by default (the teacher's probabilities, tempered when distilling), or hard
(its argmax) optionally only for test images at least ``pseudo.threshold`` confident. Only test
images are ever pseudo-labelled: validation images and labels never enter the pseudo set (checked
before every student, ``check_test_only``), so the validation log loss stays an honest estimate.

Cross pseudo-labelling (``pseudo.cross``): the test set is split in two halves (fixed by the image
ids, ``image_halves``), and two students each learn one half's pseudo-labels and predict the other
half; the fold's held-out rows are split the same way, so every prediction, out-of-fold or test,
comes from a student that never learned that image's pseudo-label (``check_never_taught``). Without
it one student learns every test image's pseudo-label and then predicts those very images: on the
synthetic demo it grew more confident and less accurate there than its out-of-fold rows showed (8
seeds: worse than finetune on hidden test on 7, while better out of fold on 8), so its CV figure did
not speak for its test predictions.

A student is the head-stage network (``pipeline.training.fine_tuning.build_network``) with the
fine-tuned (or the previous iteration's) weights, trained with ``finetune``'s settings on the train
rows plus the pseudo set, every batch holding exactly ``round(pseudo.fraction * finetune.batch_size)``
pseudo rows (``pipeline.training.datamodules.MixedBatchSampler``); it predicts with test-time
augmentation (``pipeline.training.prediction.tta_predictions``).
"""

from __future__ import annotations

import shutil
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from pipeline import models
from pipeline.config import Config, PseudoConfig
from pipeline.errors import StageError
from pipeline.metrics import read_predictions
from pipeline.models import input_hw
from pipeline.training import fine_tuning
from pipeline.training import tables as image_tables
from pipeline.training.checkpoint import MODEL_FILE
from pipeline.training.classifier import ClassifierModule
from pipeline.training.datamodules import ImageDataModule, PseudoSet
from pipeline.training.fine_tuning import TRAINING_CODE, build_network
from pipeline.training.folds import monitors_held_out
from pipeline.training.head import head_file
from pipeline.training.optim import TrainSettings
from pipeline.training.prediction import FineTuned, tta_predictions
from pipeline.training.resume import fingerprint
from pipeline.training.tables import ImageTable, one_hot
from pipeline.training.trainer import fit_or_resume, uses_cuda

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


# ---------------------------------------------------------------------------- students


def iteration_fingerprint(cfg: Config, iteration: int, pseudo: PseudoSet, inputs: list[Path],
                          tables: dict[str, ImageTable], modules: Sequence[ModuleType] = ()) -> str:
    settings = {
        "iteration": iteration,
        "model": cfg.model.model_dump(mode="json"),
        "augment": cfg.augment.model_dump(mode="json"),
        "finetune": cfg.finetune.model_dump(mode="json", exclude={"trainer": {"resume"}}),
        "pseudo": cfg.pseudo.model_dump(mode="json", exclude={"iterations"}),
        "images": [tables["train"].ids, tables["valid"].ids, pseudo.table.ids],
        "validation": cfg.split.validation,
    }
    code = [*TRAINING_CODE, fine_tuning, image_tables, sys.modules[__name__], *modules]
    return fingerprint(settings, files=inputs, modules=code,
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


@dataclass
class Student:
    """A trained student, the pseudo set it learned and its predictions of the rows it never learned."""

    fitted: FineTuned
    pseudo: PseudoSet
    pseudo_count: int  # pseudo rows per batch
    valid_rows: np.ndarray  # the held-out rows it predicts (indices into tables["valid"])
    test_rows: np.ndarray  # the test images it predicts
    valid_probs: np.ndarray
    test_probs: np.ndarray
    tta: dict[str, Any]


def teach_student(cfg: Config, fold: int, tables: dict[str, ImageTable], teacher_probs: np.ndarray,
                  halves: tuple[np.ndarray, np.ndarray], half: int | None, state: dict[str, Any] | None,
                  out_dir: Path, iteration: int, inputs: list[Path], label: str, callbacks: Sequence[Callback],
                  modules: Sequence[ModuleType] = ()) -> Student:
    """Student ``half`` (None: the only one) of ``iteration``: pseudo-labels for the test images it is
    taught (``halves``: the test and held-out rows' halves), checked, then trained
    (``train_student``) and its own rows predicted with TTA."""
    ps = cfg.pseudo
    test_halves, valid_halves = halves
    L.seed_everything(ps.seed, workers=True, verbose=False)
    taught = rows_of(test_halves, half, taught=True)
    pseudo = make_pseudo_set(tables["test"].subset(taught), teacher_probs[taught], ps)
    check_test_only(pseudo, tables)
    predicted_test, predicted_valid = rows_of(test_halves, half, taught=False), rows_of(valid_halves, half, taught=False)
    if half is not None:
        check_never_taught(pseudo, tables["test"].subset(predicted_test))
    fitted, pseudo_count = train_student(cfg, fold, tables, pseudo, state, out_dir,
                                         iteration_fingerprint(cfg, iteration, pseudo, inputs, tables, modules),
                                         label, callbacks)
    valid_probs, test_probs, tta = tta_predictions(
        cfg, fitted, tables["valid"].subset(predicted_valid), tables["test"].subset(predicted_test))
    return Student(fitted, pseudo, pseudo_count, predicted_valid, predicted_test, valid_probs, test_probs, tta)
