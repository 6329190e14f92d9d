"""Resume means resume: a training run interrupted after an epoch or within one, then run again,
trains only what was left (from the next batch of the same epoch order) and ends with the weights of
an uninterrupted run; ``last.ckpt`` is written at every epoch's end and every
``CHECKPOINT_EVERY_S`` within an epoch, atomically; a checkpoint that does not load means starting
over, and the log says where a run resumed or why it started over.

Every stage trains through ``fit_or_resume``, on one of two data modules: cached features (the head)
and images (finetune, pseudo students, fine-tuned members, pretrain). Both are resumed here with small
networks (staged unfreezing, frozen-then-free batchnorm, dropout, both schedules, with and without
validation); the real finetune stage is killed with SIGKILL in a subprocess.

Weights are compared exactly: on CPU a resumed run repeats the uninterrupted run's operations on the
same values in the same order, so equal means bit-equal (this is what the fault-injection tests
demand of the prediction files), and any drift would be a resume bug, not rounding."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from test_finetune import ROOT, TINY, link_inputs, prepared, tiny_cfg  # noqa: F401  (prepared is a fixture)

from pipeline.config import load_profile
from pipeline.console import VERBOSE_ENV
from pipeline.convfeatures.cache import FeatureSplit
from pipeline.io import atomic_write_json, read_json
from pipeline.models import create_dense_head
from pipeline.stages import finetune
from pipeline.training import checkpoint, resume
from pipeline.training.checkpoint import LAST_FILE, checkpoint_problem
from pipeline.training.classifier import ClassifierModule
from pipeline.training.datamodules import CachedFeaturesDataModule, ImageDataModule, PseudoSet
from pipeline.training.optim import TrainSettings
from pipeline.training.resume import RUN_FILE, plan_run
from pipeline.training.tables import read_tables
from pipeline.training.trainer import fit_or_resume

CLASSES = ["a", "b", "c"]
MAX_EPOCHS = 4
SMOKE = load_profile("smoke")
CPU = SMOKE.finetune.trainer  # one CPU device, fp32


def finetune_settings(**changes) -> TrainSettings:
    """The smoke profile's finetune settings (adam, a low first epoch, staged unfreezing from one block,
    batchnorm statistics frozen in epoch 0) with ``changes`` for networks that learn in a few epochs."""
    return TrainSettings.from_section(load_profile("smoke", {f"finetune.{k}": v for k, v in changes.items()}).finetune)


SETTINGS = {
    "first_epoch": finetune_settings(lr=1e-2, first_epoch_lr=1e-3, unfreeze_every=1, seed=5),
    # the pretrain stage's: AdamW, per-step one-cycle, every block from the start
    "onecycle": TrainSettings(optimizer="adamw", lr=1e-2, weight_decay=SMOKE.pretrain.weight_decay, seed=5,
                              schedule="onecycle"),
    # a rate high enough for early stopping (patience 1) to end a 12-epoch run early
    "overshooting": finetune_settings(lr=0.1, first_epoch_lr=0.01, unfreeze_every=1, seed=5),
}


class SimulatedKill(RuntimeError):
    pass


class KillAt(L.Callback):
    """Raises as batch ``batch`` of epoch ``epoch`` (0-based) starts: the process dies there, and the
    checkpoint it left is the one before."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            raise SimulatedKill(f"killed at epoch {self.epoch}, batch {self.batch}")


class KillAfterTraining(L.Callback):
    """Raises once the fit loop is done, before the run is recorded complete."""

    def on_train_end(self, trainer, module) -> None:
        raise SimulatedKill("killed after the last checkpoint")


class TrainedBatches(L.Callback):
    """The (epoch, batch) pairs this run trained, in order."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, batch_idx))


def all_batches(epochs: range, per_epoch: int, first_batch: int = 0) -> list[tuple[int, int]]:
    return [(e, b) for e in epochs for b in range(first_batch if e == epochs.start else 0, per_epoch)]


def same_log(out: Path, other: Path) -> bool:
    """Whether two runs' CSV logs (the report's learning curves) hold the same rows."""
    return (out / "logs" / "metrics.csv").read_bytes() == (other / "logs" / "metrics.csv").read_bytes()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


# ---------------------------------------------------------------------------- cached features (the head)


def feature_split(name: str, n_images: int, copies: int, seed: int, dim: int = 6) -> FeatureSplit:
    """``copies`` noisy copies of ``n_images`` feature rows around one centre per class (copy-major rows)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n_images) % len(CLASSES)
    centres = np.random.default_rng(0).normal(size=(len(CLASSES), dim)) * 2
    features = (centres[labels][None] + rng.normal(size=(copies, n_images, dim))).reshape(-1, dim)
    index = pd.DataFrame({"id": [f"{name}{i}" for _ in range(copies) for i in range(n_images)],
                          "copy": np.repeat(np.arange(copies), n_images),
                          "label": [CLASSES[label] for _ in range(copies) for label in labels]})
    index["row"] = np.arange(len(index))
    return FeatureSplit(name, index, features.astype(np.float16), copies)


def dense_fit(root: Path, settings: str, monitor: bool, callbacks=(), epochs: int = MAX_EPOCHS,
              patience: int = MAX_EPOCHS):
    """The head stage's fit on 40 cached images (5 batches an epoch): a dense head with two hidden
    blocks (staged unfreezing) and dropout."""
    L.seed_everything(5, workers=True, verbose=False)
    network = create_dense_head(6, [12, 12], dropout=0.3, num_classes=len(CLASSES))
    module = ClassifierModule(network, SETTINGS[settings], [list(network[1:5]), list(network[5:9])])
    data = CachedFeaturesDataModule(feature_split("train", 40, 3, seed=1), feature_split("valid", 12, 1, seed=2),
                                    batch_size=8, classes=CLASSES, seed=5)
    out = root / "out"
    return fit_or_resume(module, data, CPU, out, epochs, patience, "toy", callbacks, label="toy",
                         keep="best" if monitor else "last", monitor=monitor, ckpt_dir=root / "ckpt")


@pytest.fixture(scope="module")
def dense_uninterrupted(tmp_path_factory):
    """Uninterrupted fits, one per (schedule, monitor), made once: (its folder, its outcome)."""
    made = {}

    def get(settings: str, monitor: bool):
        if (settings, monitor) not in made:
            root = tmp_path_factory.mktemp(f"{settings}{monitor}")
            made[settings, monitor] = root, dense_fit(root, settings, monitor)
        return made[settings, monitor]
    return get


@pytest.mark.parametrize("settings", ["first_epoch", "onecycle"])
@pytest.mark.parametrize("monitor", [True, False], ids=["validated", "cv"])
@pytest.mark.parametrize(("kill_epoch", "kill_batch", "every_s"), [
    (MAX_EPOCHS - 1, 0, 1e9),  # in the last epoch, after the previous epoch's checkpoint
    (1, 3, 0.0),  # within epoch 2, after its third batch's checkpoint
], ids=["epoch_end", "mid_epoch"])
def test_a_killed_fit_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(
        tmp_path, dense_uninterrupted, monkeypatch, capfd, settings, monitor, kill_epoch, kill_batch, every_s):
    whole_root, whole = dense_uninterrupted(settings, monitor)
    monkeypatch.setattr(resume, "CHECKPOINT_EVERY_S", every_s)
    with pytest.raises(SimulatedKill):
        dense_fit(tmp_path, settings, monitor, [KillAt(kill_epoch, kill_batch)])
    assert read_json(tmp_path / "ckpt" / RUN_FILE)["status"] == "running"
    capfd.readouterr()

    trained = TrainedBatches()
    resumed = dense_fit(tmp_path, settings, monitor, [trained])
    assert resumed.facts["resumed"] is True
    assert trained.seen == all_batches(range(kill_epoch, MAX_EPOCHS), 5, kill_batch)
    for fact in ("epochs", "global_step", "best_epoch", "best_valid_logloss_during_training"):
        assert resumed.facts[fact] == whole.facts[fact], fact
    assert_same_weights(resumed.network, whole.network)
    assert same_log(tmp_path / "out", whole_root / "out")
    note = capfd.readouterr().err
    if kill_batch:
        assert f"within epoch {kill_epoch + 1}/{MAX_EPOCHS}: batches 1-{kill_batch} of 5 done" in note
    else:
        assert f"after epoch {kill_epoch}/{MAX_EPOCHS}: training epoch {MAX_EPOCHS}/{MAX_EPOCHS}" in note


@pytest.mark.parametrize("kill", ["after_training", "in_the_last_epoch"])
def test_a_run_that_early_stopping_ended_stays_ended_when_resumed(tmp_path, capfd, kill):
    """Early stopping's verdict is part of the checkpoint: killed after the epoch that stopped it, the
    rerun trains nothing; killed within that epoch, it trains the rest of it and stops there too."""
    whole = dense_fit(tmp_path / "whole", "overshooting", True, epochs=12, patience=1)
    stopped = whole.facts["epochs"]
    assert stopped < 12  # stopped early: what this test is about
    killer = KillAfterTraining() if kill == "after_training" else KillAt(stopped - 1, 2)
    with pytest.raises(SimulatedKill):
        dense_fit(tmp_path / "killed", "overshooting", True, [killer], epochs=12, patience=1)
    capfd.readouterr()
    trained = TrainedBatches()
    resumed = dense_fit(tmp_path / "killed", "overshooting", True, [trained], epochs=12, patience=1)
    assert trained.seen == ([] if kill == "after_training" else all_batches(range(stopped - 1, stopped), 5))
    assert resumed.facts["resumed"] is True
    for fact in ("epochs", "global_step", "best_epoch", "best_valid_logloss_during_training"):
        assert resumed.facts[fact] == whole.facts[fact], fact
    assert_same_weights(resumed.network, whole.network)
    if kill == "after_training":
        assert f"training had ended after epoch {stopped}/12, nothing left to train" in capfd.readouterr().err


# ---------------------------------------------------------------------------- damaged checkpoints, atomic writes


def flip_a_tensor_byte(path: Path) -> None:
    """One byte of a tensor's data changed in place: the archive still opens, the tensor is wrong."""
    with zipfile.ZipFile(path) as archive:
        record = next(info for info in archive.infolist() if "/data/" in info.filename and info.file_size > 8)
    blob = bytearray(path.read_bytes())
    name_length = int.from_bytes(blob[record.header_offset + 26:record.header_offset + 28], "little")
    extra_length = int.from_bytes(blob[record.header_offset + 28:record.header_offset + 30], "little")
    blob[record.header_offset + 30 + name_length + extra_length + 4] ^= 0xFF
    path.write_bytes(bytes(blob))


DAMAGE = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
    "a_flipped_tensor_byte": flip_a_tensor_byte,
    "foreign_bytes": lambda path: path.write_bytes(b"not a checkpoint" * 100),
    "empty": lambda path: path.write_bytes(b""),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_means_starting_over_and_saying_so(tmp_path, dense_uninterrupted, capfd, damage):
    with pytest.raises(SimulatedKill):
        dense_fit(tmp_path, "first_epoch", True, [KillAt(2, 0)])
    last = tmp_path / "ckpt" / LAST_FILE
    assert checkpoint_problem(last) is None
    DAMAGE[damage](last)
    problem = checkpoint_problem(last)
    assert problem is not None
    capfd.readouterr()

    trained = TrainedBatches()
    again = dense_fit(tmp_path, "first_epoch", True, [trained])
    note = capfd.readouterr().err
    assert f"{last}: the interrupted run's checkpoint {problem}: starting over" in note
    assert again.facts["resumed"] is False
    assert trained.seen == all_batches(range(MAX_EPOCHS), 5)
    whole_root, whole = dense_uninterrupted("first_epoch", True)
    assert_same_weights(again.network, whole.network)
    assert same_log(tmp_path / "out", whole_root / "out")


def test_a_killed_run_without_a_checkpoint_yet_starts_over_and_says_so(tmp_path, capfd):
    with pytest.raises(SimulatedKill):
        dense_fit(tmp_path, "first_epoch", False, [KillAt(0, 2)])
    assert not (tmp_path / "ckpt" / LAST_FILE).exists()
    capfd.readouterr()
    assert plan_run(tmp_path / "ckpt", "toy", resume=True) == ("fresh", None)
    assert "the interrupted run's checkpoint is missing: starting over" in capfd.readouterr().err


def test_a_complete_run_is_reused_from_the_checkpoint_it_keeps(tmp_path):
    """Best for a validated run, last for one that keeps its last epoch (a cv fold model has no best)."""
    dense_fit(tmp_path, "first_epoch", False)
    assert not (tmp_path / "ckpt" / "best.ckpt").exists()
    assert plan_run(tmp_path / "ckpt", "toy", resume=True, keep="last") == ("reuse", tmp_path / "ckpt" / LAST_FILE)
    trained = TrainedBatches()
    assert dense_fit(tmp_path, "first_epoch", False, [trained]).facts["reused"] is True
    assert trained.seen == []


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("the write dies here")


def test_checkpoint_writes_are_atomic(tmp_path):
    """A write that dies midway leaves the previous checkpoint and no temp file; a later plan clears the
    temp files of writes that a kill cut short."""
    path = tmp_path / LAST_FILE
    io = checkpoint.AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    with pytest.raises(RuntimeError, match="dies here"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "extra": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST_FILE]

    (tmp_path / ".last.ckpt.0123abcd.tmp.ckpt").write_bytes(b"half a checkpoint")
    atomic_write_json(tmp_path / RUN_FILE, {"fingerprint": "f", "status": "running"})
    assert plan_run(tmp_path, "f", resume=True) == ("resume", path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST_FILE, RUN_FILE]


# ---------------------------------------------------------------------------- images (finetune, pseudo, members, pretrain)


class TinyConvNet(torch.nn.Sequential):
    """uint8 images -> 10 logits: conv, batchnorm, dropout; two blocks for staged unfreezing."""

    def __init__(self) -> None:
        super().__init__(torch.nn.Conv2d(3, 6, 3, stride=2), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                         torch.nn.Conv2d(6, 8, 3, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                         torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Dropout(0.2), torch.nn.Linear(8, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images.float() / 255)


def image_fit(prepared: Path, root: Path, settings: str, callbacks=(), workers: int = 2):  # noqa: F811
    """The image stages' fit: 30 augmented train images with a pseudo-labelled test image in every
    batch of 4 (10 batches an epoch, pseudo's mix), loader workers, validation on the held-out images,
    the last epoch's weights kept (pretrain's choice)."""
    cfg = tiny_cfg(prepared)
    tables = read_tables(cfg, use_sample=False)
    targets = np.random.default_rng(0).dirichlet(np.ones(10), len(tables["test"])).astype(np.float32)
    data = ImageDataModule(tables["train"], tables["valid"], (24, 32), cfg.augment, batch_size=4, num_workers=workers,
                           seed=3, copies=3, pseudo=PseudoSet(tables["test"], targets, fraction=0.25, temperature=2.0),
                           n_classes=10)
    L.seed_everything(3, workers=True, verbose=False)
    network = TinyConvNet()
    blocks = [[network[i] for i in range(3)], [network[i] for i in range(3, 6)]]
    module = ClassifierModule(network, SETTINGS[settings], blocks)
    return fit_or_resume(module, data, CPU, root / "out", 3, 3, "tiny", callbacks, label="tiny", keep="last",
                         ckpt_dir=root / "ckpt")


@pytest.mark.parametrize("settings", ["first_epoch", "onecycle"])
def test_an_image_fit_with_pseudo_rows_and_loader_workers_resumes_within_an_epoch(
        prepared, tmp_path, monkeypatch, settings):  # noqa: F811
    """With workers a loader draws its batch order when its iterator is created, which Lightning does
    for a resumed run before setting the epoch: the resumed epoch must still get its own order."""
    whole = image_fit(prepared, tmp_path / "whole", settings)
    monkeypatch.setattr(resume, "CHECKPOINT_EVERY_S", 0.0)
    with pytest.raises(SimulatedKill):
        image_fit(prepared, tmp_path / "killed", settings, [KillAt(1, 6)])
    trained = TrainedBatches()
    resumed = image_fit(prepared, tmp_path / "killed", settings, [trained])
    assert trained.seen == all_batches(range(1, 3), 10, 6)
    assert resumed.facts["global_step"] == whole.facts["global_step"] == 30
    assert_same_weights(resumed.network, whole.network)


# ---------------------------------------------------------------------------- the finetune stage, killed


KILLED_STAGE = """
import io, json, sys, time
import lightning as L
import torch
from pathlib import Path
from pipeline.config import load_profile
from pipeline.stages import finetune
from pipeline.training import resume, trainer


def hold(marker):
    Path(marker).write_text("holding")
    while True:
        time.sleep(1)


class HoldAt(L.Callback):
    # As batch `batch` of epoch `epoch` (0-based) starts: say so in a file, then wait to be killed.
    def __init__(self, epoch, batch, marker):
        self.epoch, self.batch, self.marker = epoch, batch, marker

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            hold(self.marker)


def holding_in_write(n, marker):
    # torch.save that, in its n-th write of last.ckpt, writes half the bytes, then waits to be killed.
    save, writes = torch.save, []

    def partial_save(obj, file, *args, **kwargs):
        if Path(getattr(file, "name", "")).name.startswith(".last.ckpt"):
            writes.append(file.name)
            if len(writes) == n:
                buffer = io.BytesIO()
                save(obj, buffer, *args, **kwargs)
                file.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                file.flush()
                hold(marker)
        return save(obj, file, *args, **kwargs)
    return partial_save


if __name__ == "__main__":
    root, overrides, every_s, where, marker = sys.argv[1:]
    resume.CHECKPOINT_EVERY_S = float(every_s)
    where = json.loads(where)
    callbacks = []
    if "write" in where:
        torch.save = holding_in_write(where["write"], marker)
    elif "line" in where:  # right after the log's line for that epoch (1-based), as the issue's kill
        show = trainer.EpochSummary.show

        def show_then_hold(self, trainer):
            show(self, trainer)
            if trainer.current_epoch + 1 == where["line"]:
                hold(marker)
        trainer.EpochSummary.show = show_then_hold
    else:
        callbacks.append(HoldAt(where["epoch"], where["batch"], marker))
    cfg = load_profile("smoke", json.loads(overrides)).at(root)
    finetune.run(cfg, fold=0, callbacks=callbacks)
"""
# Guards against a hang only: the killed run trains under two epochs of the tiny network (seconds),
# but the machine running the tests may be loaded.
HANG_GUARD_S = 600


def run_until_held(script: Path, root: Path, overrides: dict, every_s: float, where: dict) -> None:
    """Run the finetune stage in a subprocess until it holds ``where`` (``{"epoch", "batch"}``: as that
    batch starts; ``{"line": e}``: once it has logged epoch ``e``'s line; ``{"write": n}``: halfway
    through its n-th write of last.ckpt), then SIGKILL it and its loader workers (the process group)."""
    marker = root / "holding"
    env = {**os.environ, "PYTHONPATH": str(ROOT), VERBOSE_ENV: "1"}  # every epoch's line
    with (root / "killed.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, str(script), str(root), json.dumps(overrides), str(every_s),
                                 json.dumps(where), str(marker)], cwd=root, env=env, stdout=log, stderr=log,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + HANG_GUARD_S
            while not marker.exists():
                assert proc.poll() is None, f"ended before its kill:\n{(root / 'killed.log').read_text()[-3000:]}"
                assert time.monotonic() < deadline, "the stage never reached its kill point"
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


# The case: 3 epochs of 15 batches (30 train images, 2 a batch).
KILLED_OVERRIDES = {**TINY, "finetune.max_epochs": 3, "finetune.patience": 5, "finetune.batch_size": 2}
STEPS_PER_EPOCH = 15


@pytest.fixture(scope="module")
def finetune_whole(prepared, tmp_path_factory):  # noqa: F811
    """The uninterrupted finetune run the killed ones must end as: its config and figures."""
    cfg = tiny_cfg(link_inputs(prepared, tmp_path_factory.mktemp("finetune_whole")), **KILLED_OVERRIDES)
    return cfg, finetune.run(cfg, fold=0)


def killed_finetune(prepared, tmp_path: Path, every_s: float, where: dict, **overrides):  # noqa: F811
    """A finetune run killed where ``run_until_held`` says, its output folder then deleted as DVC does
    before rerunning a stage; its config."""
    root = link_inputs(prepared, tmp_path / "killed")
    script = tmp_path / "killed_stage.py"
    script.write_text(textwrap.dedent(KILLED_STAGE))
    run_until_held(script, root, {**KILLED_OVERRIDES, **overrides}, every_s, where)
    cfg = tiny_cfg(root, **KILLED_OVERRIDES, **overrides)
    shutil.rmtree(cfg.paths.fold_models("finetune", 0))
    return cfg


def assert_same_predictions(cfg, whole_cfg) -> None:
    for name in ("oof.csv", "test.csv"):
        made = cfg.paths.fold_predictions("finetune", 0) / name
        assert made.read_bytes() == (whole_cfg.paths.fold_predictions("finetune", 0) / name).read_bytes(), name


@pytest.mark.parametrize(("every_s", "where", "epoch", "batch", "workers"), [
    # the case: killed once the log says "epoch 2/3" (checkpoints at epoch ends only)
    (300.0, {"line": 2}, 2, 0, 0),
    # killed within epoch 2, after its 9th batch's checkpoint, with loader workers
    (0.0, {"epoch": 1, "batch": 9}, 1, 9, 2),
], ids=["after_epoch_2_of_3", "mid_epoch"])
def test_a_finetune_killed_with_sigkill_resumes_to_the_uninterrupted_predictions(
        prepared, finetune_whole, tmp_path, capfd, every_s, where, epoch, batch, workers):  # noqa: F811
    """Resumes at (``epoch``, ``batch``), 0-based, and trains only the rest."""
    whole_cfg, uninterrupted = finetune_whole
    cfg = killed_finetune(prepared, tmp_path, every_s, where, **{"finetune.num_workers": workers})
    ckpts = cfg.paths.checkpoints_for(cfg.paths.fold_models("finetune", 0))
    assert read_json(ckpts / RUN_FILE)["status"] == "running" and checkpoint_problem(ckpts / LAST_FILE) is None
    capfd.readouterr()

    trained = TrainedBatches()
    resumed = finetune.run(cfg, fold=0, callbacks=[trained])
    assert trained.seen == all_batches(range(epoch, 3), STEPS_PER_EPOCH, batch)
    assert resumed["resumed"] is True
    for fact in ("global_step", "epochs", "best_epoch"):
        assert resumed[fact] == uninterrupted[fact], fact
    assert_same_predictions(cfg, whole_cfg)
    note = capfd.readouterr().err
    if batch:
        assert f"within epoch {epoch + 1}/3: batches 1-{batch} of {STEPS_PER_EPOCH} done" in note
    else:
        assert f"after epoch {epoch}/3: training epoch 3/3" in note


def test_a_finetune_killed_while_writing_its_checkpoint_resumes_from_the_one_before(
        prepared, finetune_whole, tmp_path):  # noqa: F811
    """Killed halfway through writing epoch 2's last.ckpt: epoch 1's is still whole and trusted, the
    half-written temp file is not, and is cleared."""
    whole_cfg, uninterrupted = finetune_whole
    cfg = killed_finetune(prepared, tmp_path, 300.0, {"write": 2})
    ckpts = cfg.paths.checkpoints_for(cfg.paths.fold_models("finetune", 0))
    assert [p.name for p in ckpts.glob(".last.ckpt.*")] != []  # the half-written one
    assert torch.load(ckpts / LAST_FILE, map_location="cpu", weights_only=True, mmap=True)["epoch"] == 0

    trained = TrainedBatches()
    resumed = finetune.run(cfg, fold=0, callbacks=[trained])
    assert trained.seen == all_batches(range(1, 3), STEPS_PER_EPOCH)
    assert resumed["global_step"] == uninterrupted["global_step"]
    assert_same_predictions(cfg, whole_cfg)
    assert list(ckpts.glob(".*")) == []
