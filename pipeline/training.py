"""The one training path of every stage that trains (pretrain stand-in, dense head, finetune,
pseudo, ensemble members): one optimiser factory, one LightningModule (which receives its network),
one trainer factory, one checkpoint format, resumable fits and (distributed) prediction.

One loss covers every batch: ``T^2 * cross_entropy(softmax(logits / T), target)``, plain
cross-entropy for a labelled row, distillation for tempered pseudo-labels (batches: see
``pipeline.datamodules``).

Staged unfreezing. The backbone is split into blocks (``pipeline.models.backbone_blocks``: VGG's 5
conv blocks, or timm's own block grouping). The head and the last ``unfreeze_blocks`` blocks train
first; every ``unfreeze_every`` epochs one more block joins. Every parameter is in the optimiser from
the start (block ``k`` from the end at ``lr * layer_lr_decay**k``); a frozen one has no gradient, so
the optimiser skips it, and its batchnorm stays in eval mode. Epoch 0 runs every group at
``first_epoch_lr / lr`` of its rate (the course: a low first epoch).

Distributed. Lightning DDP re-executes the entry point per rank, so every rank runs the whole stage
function: only the launcher process (rank 0) writes files, and prediction after a fit is sharded
over the ranks and gathered, so every rank holds the same probabilities.

Resume. ``<out>/run.json`` holds a fingerprint of the config, inputs and code. A run of the same
fingerprint that was interrupted resumes from ``last.ckpt``, i.e. from the last epoch boundary
(Lightning saves it after each epoch; the interrupted epoch runs again from its start). The re-run epoch
repeats exactly: sampling is seeded by ``(seed, epoch)``, augmentation by ``(seed, copy, image)`` and
dropout by ``(seed, epoch, batch)``, so a resumed run ends with the same weights as an uninterrupted
one (tests/test_finetune.py). A complete run is reused (its best checkpoint loaded) without training;
anything else starts fresh. Checkpoints must be on a file system every rank sees (multi-node).
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import os
import random
import sys
import time
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch import nn
from torch.utils.data import DataLoader, Subset

from pipeline.config import AugmentConfig, TrainerConfig
from pipeline.console import PROGRESS_EVERY_S, verbose
from pipeline.data import ImageRowsDataset, build_augmentation, seed_worker
from pipeline.datamodules import epoch_seed
from pipeline.errors import StageError
from pipeline.io import atomic_write_bytes, atomic_write_json, file_sha256, read_json
from pipeline.tables import ImageTable

MONITOR = "valid/logloss"
RUN_FILE = "run.json"
MODEL_FILE = "model.pt"


# ---------------------------------------------------------------------------- checkpoints


def save_network(path: Path, network: nn.Module, meta: dict[str, Any]) -> Path:
    """The one checkpoint format of every stage's network (pretrain backbone, dense head, fine-tuned
    CNN): ``{"state_dict", "meta"}``, written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    # Through a buffer: torch.save names the archive's root after the file it writes, and a temp
    # file's random name would make equal weights differ byte-wise (DVC's run cache keys on bytes).
    buffer = io.BytesIO()
    torch.save({"state_dict": state, "meta": meta}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_network_file(path: Path | str, writer: str = "stage that writes it") -> dict[str, Any]:
    """``{"state_dict", "meta"}`` saved by ``save_network``; a StageError naming the file when it is
    missing or unreadable (a truncated file would otherwise fail with a pickle traceback)."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path} not found: run the {writer} stage first")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated or foreign bytes: torch raises several kinds
        raise StageError(f"{path}: unreadable checkpoint ({type(err).__name__}); delete it and rerun the stage "
                         "that writes it") from None
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise StageError(f"{path}: not a checkpoint of this pipeline (no state_dict)")
    return blob


def load_network_state(path: Path, writer: str = "stage that writes it") -> dict[str, torch.Tensor]:
    return load_network_file(path, writer)["state_dict"]


# ---------------------------------------------------------------------------- optimisation


@dataclass(frozen=True)
class TrainSettings:
    """What the one optimiser factory and the one LightningModule need, whichever stage trains:
    the head (``head`` section), fine-tuning and pseudo (``finetune``), the pretrain stand-in."""

    optimizer: str = "adam"  # adam | adamw | sgd | nesterov | rmsprop
    lr: float = 1e-3
    first_epoch_lr: float | None = None  # None: no low first epoch
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    layer_lr_decay: float = 1.0  # block k from the end at lr * decay**k
    unfreeze_blocks: int | None = None  # None: every block trains from the start
    unfreeze_every: int = 0
    schedule: str = "first_epoch"  # first_epoch (constant after a low epoch 0) | onecycle
    # Keep every batchnorm layer's running statistics as they are (eval mode) while training: the
    # network then computes at evaluation what it computed in training, and a fine-tune starts exactly
    # where its head left it (train-mode statistics on augmented batches shift the features the head
    # was fitted on). The affine weights still train. True: every epoch; "first_epoch": epoch 0 only
    # (the low-learning-rate one), then the statistics follow the training data.
    freeze_bn_stats: bool | str = False

    @classmethod
    def from_section(cls, section: Any, **changes: Any) -> TrainSettings:
        """From a config section (``cfg.head``, ``cfg.finetune``): the fields it has, then ``changes``."""
        names = {f.name for f in fields(cls)}
        values = {name: getattr(section, name) for name in names if hasattr(section, name)}
        return replace(cls(**values), **changes)


def create_optimizer(groups: list[dict[str, Any]], settings: TrainSettings) -> torch.optim.Optimizer:
    """adam | adamw | sgd (momentum) | nesterov | rmsprop over param groups that carry their own lr."""
    wd, momentum = settings.weight_decay, settings.momentum
    if settings.optimizer == "adam":
        return torch.optim.Adam(groups, lr=settings.lr, weight_decay=wd)
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, weight_decay=wd)
    if settings.optimizer in ("sgd", "nesterov"):
        return torch.optim.SGD(groups, lr=settings.lr, momentum=momentum, nesterov=settings.optimizer == "nesterov",
                               weight_decay=wd)
    if settings.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=settings.lr, alpha=0.9, weight_decay=wd)
    raise ValueError(f"unknown optimizer {settings.optimizer!r}")


def first_epoch_schedule(optimizer: torch.optim.Optimizer, first_epoch_lr: float, lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """``first_epoch_lr`` during epoch 0, ``lr`` afterwards (stepped once per epoch)."""
    ratio = first_epoch_lr / lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: ratio if epoch == 0 else 1.0)


def block_parameters(block: list[nn.Module]) -> list[nn.Parameter]:
    return [p for layer in block for p in layer.parameters()]


def trainable_block_count(epoch: int, settings: TrainSettings, n_blocks: int) -> int:
    """How many blocks (counted from the last) train in ``epoch`` under staged unfreezing."""
    if settings.unfreeze_blocks is None:
        return n_blocks
    extra = epoch // settings.unfreeze_every if settings.unfreeze_every else 0
    return min(n_blocks, settings.unfreeze_blocks + extra)


def set_trainable_blocks(blocks: list[list[nn.Module]], count: int) -> None:
    """The last ``count`` blocks train; earlier ones get no gradients and keep batchnorm in eval."""
    first_trainable = len(blocks) - count
    for i, block in enumerate(blocks):
        trainable = i >= first_trainable
        for layer in block:
            layer.train(trainable)
            for p in layer.parameters():
                p.requires_grad_(trainable)


def batchnorm_frozen(setting: bool | str, epoch: int) -> bool:
    """Whether ``freeze_bn_stats`` (True, False or "first_epoch") keeps the statistics in ``epoch``."""
    return setting is True or (setting == "first_epoch" and epoch == 0)


def freeze_batchnorm_statistics(network: nn.Module) -> None:
    """Every batchnorm layer in eval mode: normalises with, and no longer updates, its running statistics."""
    for module in network.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d | nn.SyncBatchNorm):
            module.eval()


def layer_param_groups(network: nn.Module, blocks: list[list[nn.Module]], lr: float, decay: float) -> list[dict[str, Any]]:
    """Every parameter outside ``blocks`` (the head) at ``lr``; block ``k`` from the end at
    ``lr * decay**k`` (earlier layers, smaller steps)."""
    in_blocks = {id(p) for block in blocks for p in block_parameters(block)}
    groups = [{"params": [p for p in network.parameters() if id(p) not in in_blocks], "lr": lr, "name": "head"}]
    for k, block in enumerate(reversed(blocks), start=1):
        params = block_parameters(block)
        if params:
            groups.append({"params": params, "lr": lr * decay**k, "name": f"block{len(blocks) - k + 1}"})
    return groups


# ---------------------------------------------------------------------------- lightning module


def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """Mean of ``T^2 * CE(softmax(logits / T), target)`` per row: cross-entropy for one-hot targets at
    T=1, Hinton's distillation loss for tempered teacher targets (T^2 keeps gradient scale)."""
    t = temperatures.to(torch.float32).view(-1, 1)
    log_probs = F.log_softmax(logits.float() / t, dim=1)
    return (-(targets.float() * log_probs).sum(dim=1) * t.view(-1) ** 2).mean()


def reseed_globals(seed: int) -> None:
    """Dropout and any other global draw: reseeded per batch so a resumed epoch repeats exactly."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class ClassifierModule(L.LightningModule):
    """The one LightningModule: trains an injected network (a ConvNet on images, or a dense head on
    cached features) on batch dicts (``pipeline.datamodules``), with optional staged unfreezing of
    ``blocks`` and layer-wise learning rates. Logs ``train/loss``, ``valid/logloss``, ``valid/acc``
    (plus ``train/lr``, ``train/trainable_blocks``). A non-finite training loss stops the run with
    an error instead of writing NaN weights."""

    def __init__(self, network: nn.Module, settings: TrainSettings, blocks: Sequence[list[nn.Module]] = (),
                 channels_last: bool = False):
        super().__init__()
        self.network = network
        self.settings = settings
        self.channels_last = channels_last
        self.blocks = list(blocks)  # plain list: the layers are registered through `network`
        if channels_last:
            self.network.to(memory_format=torch.channels_last)
        self.save_hyperparameters({"settings": asdict(settings), "channels_last": channels_last})
        self._valid_sums = torch.zeros(3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.network(inputs)

    def on_train_epoch_start(self) -> None:
        self.network.train()  # Lightning restores the last epoch's modes after validation: start afresh
        count = trainable_block_count(self.current_epoch, self.settings, len(self.blocks))
        set_trainable_blocks(self.blocks, count)
        if batchnorm_frozen(self.settings.freeze_bn_stats, self.current_epoch):
            freeze_batchnorm_statistics(self.network)
        self.log("train/trainable_blocks", float(count), on_step=False, on_epoch=True, sync_dist=False)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=False, on_epoch=True, sync_dist=False)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = soft_target_loss(self(batch["input"]), batch["target"], batch["temperature"])
        if not torch.isfinite(loss):
            raise StageError(f"training loss is {float(loss)} at epoch {self.current_epoch}, batch {batch_idx}: "
                             "non-finite inputs or a learning rate too high; nothing was written")
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(batch["input"]), sync_dist=True)
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout (and any other global draw) from (seed, epoch, batch, rank) alone: a run resumed at an
        # epoch boundary repeats the lost epoch exactly, whatever else drew from the global generators
        # in between (Lightning's restore draws a loader seed at a different point than a fresh epoch).
        reseed_globals(epoch_seed(self.settings.seed, self.current_epoch, batch_idx, self.global_rank))

    def on_validation_epoch_start(self) -> None:
        self._valid_sums = torch.zeros(3, device=self.device, dtype=torch.float64)  # loss sum, correct, count

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        labels = batch["label"]
        keep = labels >= 0  # the padding row is -1
        logits = self(batch["input"]).float()[keep]
        labels = labels[keep]
        if len(labels):
            self._valid_sums += torch.stack([
                F.cross_entropy(logits, labels, reduction="sum").double(),
                (logits.argmax(1) == labels).sum().double(),
                torch.tensor(float(len(labels)), device=self.device, dtype=torch.float64),
            ])

    def on_validation_epoch_end(self) -> None:
        loss_sum, correct, count = self.trainer.strategy.reduce(self._valid_sums, reduce_op="sum").tolist()
        count = max(count, 1.0)
        self.log(MONITOR, loss_sum / count, prog_bar=True)  # already summed over ranks
        self.log("valid/acc", correct / count)

    def configure_optimizers(self) -> dict[str, Any]:
        s = self.settings
        optimizer = create_optimizer(layer_param_groups(self.network, self.blocks, s.lr, s.layer_lr_decay), s)
        if s.schedule == "onecycle":
            peaks = [g["lr"] for g in optimizer.param_groups]
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, pct_start=0.25,
                                                            total_steps=max(int(self.trainer.estimated_stepping_batches), 1))
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
        scheduler = first_epoch_schedule(optimizer, s.first_epoch_lr or s.lr, s.lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


# ---------------------------------------------------------------------------- trainer


def uses_cuda(trainer_cfg: TrainerConfig) -> bool:
    if trainer_cfg.accelerator in ("gpu", "cuda"):
        return True
    return trainer_cfg.accelerator == "auto" and torch.cuda.is_available()


def resolve_precision(trainer_cfg: TrainerConfig) -> str:
    """``auto``: bf16-mixed on a GPU that has bf16 (16-mixed otherwise), fp32 on CPU."""
    if trainer_cfg.precision != "auto":
        return trainer_cfg.precision
    if not uses_cuda(trainer_cfg):
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


def process_count(trainer_cfg: TrainerConfig) -> int:
    """How many training processes the config asks for (devices per node x nodes)."""
    devices = trainer_cfg.devices
    if isinstance(devices, str) and devices.strip() in ("auto", "-1"):
        per_node = torch.cuda.device_count() if uses_cuda(trainer_cfg) else 1
    elif isinstance(devices, str):
        per_node = len([d for d in devices.split(",") if d.strip()]) if "," in devices else int(devices)
    else:
        per_node = int(devices)
    return max(per_node, 1) * trainer_cfg.num_nodes


def build_strategy(trainer_cfg: TrainerConfig) -> str | Strategy:
    """DDP (asked for, or what ``auto`` picks for several processes) with ``find_unused_parameters``:
    staged unfreezing leaves frozen blocks without gradients, which plain DDP would wait for forever."""
    if trainer_cfg.strategy == "ddp" or (trainer_cfg.strategy == "auto" and process_count(trainer_cfg) > 1):
        return DDPStrategy(find_unused_parameters=True)
    return trainer_cfg.strategy


def interactive() -> bool:
    return sys.stderr.isatty()


class EpochSummary(Callback):
    """Epoch lines on stderr where there is no progress bar (DVC/Prefect logs): every epoch when
    verbose, else at most one per ``PROGRESS_EVERY_S`` seconds (a long stage still shows progress)."""

    def __init__(self, name: str):
        self.name = name
        self.start = self.shown = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        now = time.perf_counter()
        if not verbose() and now - self.shown < PROGRESS_EVERY_S:
            return
        self.shown = now
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train/loss", MONITOR, "valid/acc")}
        shown = " ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
        print(f"[{self.name}] epoch {trainer.current_epoch + 1}/{trainer.max_epochs} step {trainer.global_step} "
              f"{shown} ({time.perf_counter() - self.start:.0f}s)", file=sys.stderr, flush=True)


def build_trainer(trainer_cfg: TrainerConfig, out_dir: Path, max_epochs: int, patience: int,
                  callbacks: Sequence[Callback] = (), label: str | None = None,
                  monitor: bool = True, ckpt_dir: Path | None = None) -> tuple[L.Trainer, ModelCheckpoint]:
    """Lightning trainer from config: best (by valid/logloss) and last checkpoints in ``ckpt_dir``
    (default ``out_dir``), early stopping, CSV + TensorBoard logs in ``out_dir``, a rich progress bar on a terminal only (else epoch lines
    prefixed with ``label``, by default the folder's name). Without ``monitor`` (a cross-validation
    fold model, whose held-out rows must not steer it) there is no validation loop, no early stopping
    and only the last checkpoint: it trains exactly ``max_epochs``."""
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir or out_dir, filename="best", monitor=MONITOR if monitor else None, mode="min",
                                 save_top_k=1 if monitor else 0, save_last=True, auto_insert_metric_name=False,
                                 enable_version_counter=False)
    stopping = [EarlyStopping(monitor=MONITOR, mode="min", patience=patience)] if monitor else []
    bars: list[Callback] = [RichProgressBar()] if interactive() else [EpochSummary(label or out_dir.name)]
    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=build_strategy(trainer_cfg),
        precision=resolve_precision(trainer_cfg),
        deterministic=trainer_cfg.deterministic,
        benchmark=trainer_cfg.benchmark,
        max_epochs=max_epochs,
        callbacks=[checkpoint, *stopping, *bars, *callbacks],
        limit_val_batches=None if monitor else 0,
        logger=[CSVLogger(save_dir=out_dir, name="logs", version=""),
                TensorBoardLogger(save_dir=out_dir, name="tb", version="", default_hp_metric=False)],
        enable_progress_bar=interactive(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        use_distributed_sampler=False,  # the samplers shard by rank themselves
    )
    return trainer, checkpoint


def quiet_training() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*LeafSpec.*", ".*exists and is not empty.*"):
        warnings.filterwarnings("ignore", message=message)
    for message in (".*smaller than the logging interval.*", ".*sync_dist=True.*", ".*Checkpoint directory.*exists.*",
                    ".*Experiment logs directory.*exists.*", ".*find_unused_parameters=True.*",
                    ".*is not writable.*", ".*isn't a `Sampler`.*"):
        warnings.filterwarnings("ignore", message=message)


# ---------------------------------------------------------------------------- resumable fit


def is_launcher_process() -> bool:
    """Rank 0 of the job, before and after Lightning launches the other ranks (which it marks
    with LOCAL_RANK/NODE_RANK; RANK under torchrun, SLURM_PROCID under SLURM)."""
    return all(int(os.environ.get(var, "0") or 0) == 0 for var in ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK"))


def fingerprint(settings: dict[str, Any], files: Sequence[Path] = (), modules: Sequence[ModuleType] = (),
                arrays: Sequence[np.ndarray] = ()) -> str:
    """A hash of what a training run depends on: settings, input files, source code, arrays."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in files:
        digest.update(file_sha256(path).encode())
    for module in modules:
        digest.update(Path(inspect.getsourcefile(module) or "").read_bytes())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def clear_run(ckpt_dir: Path, out_dir: Path | None = None) -> None:
    """Forget a previous run: its checkpoints and state in ``ckpt_dir``, its weights and CSV log in ``out_dir``."""
    for folder in {ckpt_dir, out_dir or ckpt_dir}:
        for name in ("best.ckpt", "last.ckpt", RUN_FILE, MODEL_FILE):
            (folder / name).unlink(missing_ok=True)
        (folder / "logs" / "metrics.csv").unlink(missing_ok=True)


def plan_run(ckpt_dir: Path, run_fingerprint: str, resume: bool, out_dir: Path | None = None) -> tuple[str, Path | None]:
    """``("reuse", best)`` for a complete run of this fingerprint, ``("resume", last)`` for an
    interrupted one, else ``("fresh", None)``; the run's state and checkpoints live in ``ckpt_dir``.
    Only rank 0 changes files; other ranks read what it wrote before they were launched, and so
    reach the same answer."""
    state = read_json(ckpt_dir / RUN_FILE) if (ckpt_dir / RUN_FILE).exists() else {}
    same = resume and state.get("fingerprint") == run_fingerprint
    if same and state.get("status") == "complete" and checkpoint_loads(ckpt_dir / "best.ckpt"):
        return "reuse", ckpt_dir / "best.ckpt"
    if same and state.get("status") == "running" and checkpoint_loads(ckpt_dir / "last.ckpt"):
        return "resume", ckpt_dir / "last.ckpt"
    if is_launcher_process():
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        clear_run(ckpt_dir, out_dir)
        atomic_write_json(ckpt_dir / RUN_FILE, {"fingerprint": run_fingerprint, "status": "running"})
    return "fresh", None


def checkpoint_loads(path: Path) -> bool:
    """Whether a Lightning checkpoint exists and is a whole torch archive (a truncated one, from a kill
    mid-write by an older version or a full disk, means start afresh rather than fail on every rerun).
    Reads only the zip's central directory, at the end of the file: a cut file has none, and the
    checkpoint itself is loaded once, by the fit that uses it."""
    if not path.exists():
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


@dataclass
class FitOutcome:
    network: nn.Module  # the best checkpoint's weights, eval mode
    facts: dict[str, Any]
    device: torch.device  # where this rank predicts
    is_global_zero: bool


def load_module_weights(module: ClassifierModule, checkpoint: Path) -> None:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    module.load_state_dict(state["state_dict"])


def fit_or_resume(module: ClassifierModule, data: L.LightningDataModule, trainer_cfg: TrainerConfig, out_dir: Path,
                  max_epochs: int, patience: int, run_fingerprint: str,
                  callbacks: Sequence[Callback] = (), label: str | None = None, keep: str = "best",
                  monitor: bool = True, ckpt_dir: Path | None = None) -> FitOutcome:
    """Fit (fresh, resumed from last.ckpt, or reused when complete) and load the ``keep`` weights:
    ``best`` (lowest valid/logloss) or ``last`` (a schedule that anneals to its end, whose validation
    is only reported). Without ``monitor``: no validation at all, exactly ``max_epochs``, the last weights.
    Checkpoints and the run's state go to ``ckpt_dir`` (default ``out_dir``): a DVC output that is
    not persistent is deleted before its stage runs, so a fold model keeps them outside it to resume."""
    keep = keep if monitor else "last"
    ckpt_dir = ckpt_dir or out_dir
    mode, checkpoint_path = plan_run(ckpt_dir, run_fingerprint, trainer_cfg.resume, out_dir)
    if mode == "reuse":
        load_module_weights(module, checkpoint_path if keep == "best" else ckpt_dir / "last.ckpt")
        facts = {**read_json(ckpt_dir / RUN_FILE).get("facts", {}), "reused": True}
        device = torch.device("cuda") if uses_cuda(trainer_cfg) else torch.device("cpu")
        return FitOutcome(module.network.eval(), facts, device, is_launcher_process())

    trainer, checkpoint = build_trainer(trainer_cfg, out_dir, max_epochs, patience, callbacks, label, monitor, ckpt_dir)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data, ckpt_path=checkpoint_path)
    seconds = time.perf_counter() - start
    trainer.strategy.barrier("best checkpoint written")
    if keep == "best":
        best = torch.load(Path(checkpoint.best_model_path or ckpt_dir / "last.ckpt"), map_location="cpu", weights_only=False)
        module.load_state_dict(best["state_dict"])
    else:  # the weights in memory are the last epoch's
        best = {"epoch": int(trainer.current_epoch) - 1}
    facts = {
        "epochs": int(trainer.current_epoch),
        "best_epoch": int(best.get("epoch", -1)),
        "global_step": int(trainer.global_step),
        "best_valid_logloss_during_training": float(checkpoint.best_model_score) if checkpoint.best_model_score is not None else None,
        "resumed": mode == "resume",
        "reused": False,
        "world_size": int(trainer.world_size),
        "precision": str(trainer.precision),
        "train_seconds": round(seconds, 3),
    }
    if trainer.is_global_zero:
        atomic_write_json(ckpt_dir / RUN_FILE, {"fingerprint": run_fingerprint, "status": "complete", "facts": facts})
    return FitOutcome(module.network.eval(), facts, trainer.strategy.root_device, trainer.is_global_zero)


# ---------------------------------------------------------------------------- prediction


def distributed_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def predict_rows(network: nn.Module, table: ImageTable, rows: np.ndarray, target_hw: tuple[int, int], batch_size: int,
                 num_workers: int, device: torch.device, channels_last: bool, copy: int = 0,
                 augment: AugmentConfig | None = None, seed: int = 0) -> np.ndarray:
    """Softmax probabilities of ``table``'s ``rows``, bf16 autocast on CUDA. Copy 0 is the plain
    image; copy ``k >= 1`` with ``augment`` is augmented as the features stage's copy k (seed
    ``(seed, k, file name)``): a test-time augmentation pass."""
    network = network.to(device).eval()
    augmentation = build_augmentation(augment) if copy > 0 and augment is not None else None
    images = ImageRowsDataset(table.paths, target_hw, labels=table.labels, copies=[copy] * len(table),
                              augmentation=augmentation, seed=seed)
    dataset = Subset(images, rows.tolist())
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        worker_init_fn=seed_worker, pin_memory=device.type == "cuda")
    cuda = device.type == "cuda"
    out = []
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = network(images)
        out.append(F.softmax(logits.float(), dim=1).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def predict_probs(network: nn.Module, table: ImageTable, target_hw: tuple[int, int], batch_size: int,
                  num_workers: int, device: torch.device, channels_last: bool = False, copy: int = 0,
                  augment: AugmentConfig | None = None, seed: int = 0) -> np.ndarray:
    """Probabilities for every row of ``table`` (copy ``copy``, see ``predict_rows``); under DDP each
    rank predicts every ``world``-th row and all ranks receive the whole result."""
    rank, world = distributed_world()
    rows = np.arange(rank, len(table), world)
    probs = predict_rows(network, table, rows, target_hw, batch_size, num_workers, device, channels_last,
                         copy, augment, seed)
    if world == 1:
        return probs
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, (rows, probs))
    result = np.zeros((len(table), max(p.shape[1] for _, p in gathered)))
    for shard_rows, shard_probs in gathered:
        result[shard_rows] = shard_probs
    return result


@torch.no_grad()
def predict_features(network: nn.Module, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities of a network on cached feature rows (the dense head), on its device."""
    network = network.eval()
    device = next(network.parameters()).device
    out = [F.softmax(network(torch.as_tensor(features[i:i + batch_size]).to(device).float()), dim=1).cpu()
           for i in range(0, len(features), batch_size)]
    return torch.cat(out).double().numpy() if out else np.zeros((0, 0))
