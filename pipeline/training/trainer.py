"""The one trainer factory (``build_trainer``) and the one fit (``fit_or_resume``: fresh, resumed or
reused, ``pipeline.training.resume``) of every stage that trains (pretrain stand-in, dense head,
finetune, pseudo, ensemble members).

Distributed. Lightning DDP re-executes the entry point per rank, so every rank runs the whole stage
function: only the launcher process (rank 0) writes files, and prediction after a fit is sharded
over the ranks and gathered, so every rank holds the same probabilities
(``pipeline.training.prediction``).
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch import nn

from pipeline.config import TrainerConfig
from pipeline.console import PROGRESS_EVERY_S, verbose
from pipeline.io import atomic_write_json, read_json
from pipeline.training.checkpoint import BEST_FILE, LAST_FILE, AtomicCheckpointIO
from pipeline.training.classifier import MONITOR, ClassifierModule
from pipeline.training.resume import (
    RUN_FILE,
    ResumeCheckpoint,
    is_launcher_process,
    plan_run,
    resumable_training_loader,
)


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


class EpochSummary:
    """Epoch lines on stderr where there is no progress bar (DVC/Prefect logs): every epoch when
    verbose, else at most one per ``PROGRESS_EVERY_S`` seconds (a long stage still shows progress).
    ``ResumeCheckpoint`` shows each once the epoch's checkpoint is written: after a line, a killed run
    resumes after that epoch."""

    def __init__(self, name: str):
        self.name = name
        self.start = self.shown = time.perf_counter()

    def show(self, trainer: L.Trainer) -> None:
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
                  monitor: bool = True, ckpt_dir: Path | None = None) -> tuple[L.Trainer, ModelCheckpoint | None]:
    """Lightning trainer from config: the best checkpoint (by valid/logloss) and ``last.ckpt``
    (``ResumeCheckpoint``) in ``ckpt_dir`` (default ``out_dir``), written atomically; early stopping;
    CSV + TensorBoard logs in ``out_dir``; a rich progress bar on a terminal only (else epoch lines
    prefixed with ``label``, by default the folder's name). Without ``monitor`` (a cross-validation
    fold model, whose held-out rows must not steer it) there is no validation loop, no early stopping
    and no best checkpoint: it trains exactly ``max_epochs``. Returns the trainer and the best
    checkpoint's callback (None without ``monitor``)."""
    ckpt_dir = ckpt_dir or out_dir
    label = label or out_dir.name
    best = None
    if monitor:
        best = ModelCheckpoint(dirpath=ckpt_dir, filename=Path(BEST_FILE).stem, monitor=MONITOR, mode="min",
                               save_top_k=1, save_last=False, auto_insert_metric_name=False,
                               enable_version_counter=False)
    stopping = [EarlyStopping(monitor=MONITOR, mode="min", patience=patience)] if monitor else []
    bars: list[Callback] = [RichProgressBar()] if interactive() else []
    resume = ResumeCheckpoint(ckpt_dir, label, summary=None if interactive() else EpochSummary(label))
    checkpoints: list[Callback] = [*([best] if best is not None else []), resume]
    trainer = L.Trainer(
        accelerator=trainer_cfg.accelerator,
        devices=trainer_cfg.devices,
        num_nodes=trainer_cfg.num_nodes,
        strategy=build_strategy(trainer_cfg),
        precision=resolve_precision(trainer_cfg),
        deterministic=trainer_cfg.deterministic,
        benchmark=trainer_cfg.benchmark,
        max_epochs=max_epochs,
        callbacks=[*stopping, *bars, *callbacks, *checkpoints],
        plugins=[AtomicCheckpointIO()],
        limit_val_batches=None if monitor else 0,
        logger=[CSVLogger(save_dir=out_dir, name="logs", version=""),
                TensorBoardLogger(save_dir=out_dir, name="tb", version="", default_hp_metric=False), resume.run_log],
        enable_progress_bar=interactive(),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=trainer_cfg.log_every_n_steps,
        use_distributed_sampler=False,  # the samplers shard by rank themselves
    )
    return trainer, best


def quiet_training() -> None:
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # ResumeCheckpoint resumes the training loader within an epoch itself (ResumableLoader).
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    for message in (".*does not have many workers.*", ".*LeafSpec.*", ".*exists and is not empty.*"):
        warnings.filterwarnings("ignore", message=message)
    for message in (".*smaller than the logging interval.*", ".*sync_dist=True.*", ".*Checkpoint directory.*exists.*",
                    ".*Experiment logs directory.*exists.*", ".*find_unused_parameters=True.*",
                    ".*is not writable.*", ".*isn't a `Sampler`.*"):
        warnings.filterwarnings("ignore", message=message)


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
    mode, checkpoint_path = plan_run(ckpt_dir, run_fingerprint, trainer_cfg.resume, out_dir, keep)
    if mode == "reuse":
        load_module_weights(module, checkpoint_path)
        facts = {**read_json(ckpt_dir / RUN_FILE).get("facts", {}), "reused": True}
        device = torch.device("cuda") if uses_cuda(trainer_cfg) else torch.device("cpu")
        return FitOutcome(module.network.eval(), facts, device, is_launcher_process())

    trainer, best = build_trainer(trainer_cfg, out_dir, max_epochs, patience, callbacks, label, monitor, ckpt_dir)
    start = time.perf_counter()
    with resumable_training_loader(data):
        trainer.fit(module, datamodule=data, ckpt_path=checkpoint_path)
    seconds = time.perf_counter() - start
    trainer.strategy.barrier("best checkpoint written")
    if keep == "best":
        kept = Path(best.best_model_path) if best is not None and best.best_model_path else ckpt_dir / LAST_FILE
        blob = torch.load(kept, map_location="cpu", weights_only=False)
        module.load_state_dict(blob["state_dict"])
    else:  # the weights in memory are the last epoch's
        blob = {"epoch": int(trainer.current_epoch) - 1}
    best_score = best.best_model_score if best is not None else None
    facts = {
        "epochs": int(trainer.current_epoch),
        "best_epoch": int(blob.get("epoch", -1)),
        "global_step": int(trainer.global_step),
        "best_valid_logloss_during_training": float(best_score) if best_score is not None else None,
        "resumed": mode == "resume",
        "reused": False,
        "world_size": int(trainer.world_size),
        "precision": str(trainer.precision),
        "train_seconds": round(seconds, 3),
    }
    if trainer.is_global_zero:
        atomic_write_json(ckpt_dir / RUN_FILE, {"fingerprint": run_fingerprint, "status": "complete", "facts": facts})
    return FitOutcome(module.network.eval(), facts, trainer.strategy.root_device, trainer.is_global_zero)
