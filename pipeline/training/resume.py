"""Resume. ``<ckpt_dir>/run.json`` holds a fingerprint of the config, inputs and code. A run of the
same fingerprint that was interrupted resumes from ``last.ckpt``, which ``ResumeCheckpoint`` writes at
the end of every epoch and, within a long epoch, every ``CHECKPOINT_EVERY_S`` seconds. A resumed run
continues where the checkpoint was taken: weights, optimiser, LR schedule, early-stopping and
best-checkpoint state, loop counters, the epoch's partial training loss, and the sampler's position
(``ResumableLoader``: the epoch's batch order is a function of ``(seed, epoch)``, so the batches
already trained are skipped without being loaded). Augmentation is seeded by ``(seed, copy, image)``
and dropout by ``(seed, epoch, batch)``, so a resumed run ends with the same weights as an
uninterrupted one (tests/test_resume.py). Checkpoints are written atomically (``AtomicCheckpointIO``);
one that does not load (a foreign or damaged file) means starting over, said on stderr. A complete
run is reused (its kept checkpoint loaded) without training; anything else starts fresh (``plan_run``;
``pipeline.training.trainer.fit_or_resume`` runs the plan). Checkpoints must be on a file system
every rank sees (multi-node).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import itertools
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Sampler

from pipeline.io import atomic_write_json, atomic_write_text, file_sha256, read_json
from pipeline.training.checkpoint import BEST_FILE, LAST_FILE, MODEL_FILE, checkpoint_problem

if TYPE_CHECKING:
    from pipeline.training.trainer import EpochSummary

RUN_FILE = "run.json"
RUN_LOG_FILE = "log.jsonl"
# Within an epoch, last.ckpt is rewritten once this many seconds have passed since it was last written
# (a VGG-16 checkpoint with Adam state is ~1.5 GB: a few seconds to write).
CHECKPOINT_EVERY_S = 300.0


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
        for name in (BEST_FILE, LAST_FILE, RUN_FILE, RUN_LOG_FILE, MODEL_FILE):
            (folder / name).unlink(missing_ok=True)
        (folder / "logs" / "metrics.csv").unlink(missing_ok=True)
    remove_partial_checkpoints(ckpt_dir)


def remove_partial_checkpoints(ckpt_dir: Path) -> None:
    """The temp files of checkpoint writes a kill interrupted (``AtomicCheckpointIO``)."""
    for path in ckpt_dir.glob(".*.tmp*") if ckpt_dir.is_dir() else ():
        path.unlink(missing_ok=True)


def plan_run(ckpt_dir: Path, run_fingerprint: str, resume: bool, out_dir: Path | None = None,
             keep: str = "best") -> tuple[str, Path | None]:
    """``("reuse", checkpoint)`` for a complete run of this fingerprint (its ``keep`` checkpoint: best
    or last), ``("resume", last)`` for an interrupted one, else ``("fresh", None)``; the run's state
    and checkpoints live in ``ckpt_dir``. A checkpoint that does not load is not trusted: the run
    starts over and says why on stderr. Only rank 0 changes files or speaks; other ranks read what it
    wrote before they were launched, and so reach the same answer."""
    launcher = is_launcher_process()
    state = read_json(ckpt_dir / RUN_FILE) if (ckpt_dir / RUN_FILE).exists() else {}
    status = state.get("status") if resume and state.get("fingerprint") == run_fingerprint else None
    if launcher:
        remove_partial_checkpoints(ckpt_dir)
    if status in ("complete", "running"):
        if status == "complete":
            mode, path = "reuse", ckpt_dir / (BEST_FILE if keep == "best" else LAST_FILE)
        else:
            mode, path = "resume", ckpt_dir / LAST_FILE
        problem = checkpoint_problem(path)
        if problem is None:
            return mode, path
        if launcher:
            what = "the complete run's checkpoint" if mode == "reuse" else "the interrupted run's checkpoint"
            print(f"{path}: {what} {problem}: starting over", file=sys.stderr, flush=True)
    if launcher:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        clear_run(ckpt_dir, out_dir)
        atomic_write_json(ckpt_dir / RUN_FILE, {"fingerprint": run_fingerprint, "status": "running"})
    return "fresh", None


class SkipBatches(Sampler):
    """The batches of ``sampler`` (a batch sampler, or a sampler of whole batches) from the ``start``-th
    on: the skipped batches' indices are drawn, their rows never loaded."""

    def __init__(self, sampler: Sampler, start: int):
        self.sampler, self.start = sampler, int(start)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.start, 0)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.sampler), self.start, None)


def loader_starting_at(loader: DataLoader, start: int) -> DataLoader:
    """``loader`` (its dataset, sampler, workers and collation) from its ``start``-th batch on."""
    if loader.batch_sampler is not None:
        batching: dict[str, Any] = {"batch_sampler": SkipBatches(loader.batch_sampler, start)}
    else:  # batch_size=None: the sampler itself yields each batch's rows
        batching = {"sampler": SkipBatches(loader.sampler, start), "batch_size": None}
    return DataLoader(loader.dataset, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                      prefetch_factor=loader.prefetch_factor, pin_memory_device=loader.pin_memory_device,
                      in_order=loader.in_order, **batching)


def sampler_epoch(loader: DataLoader) -> int | None:
    """The epoch the loader's (batch) sampler is set to, None for a sampler without epochs."""
    for sampler in (loader.batch_sampler, loader.sampler):
        epoch = getattr(sampler, "epoch", None)
        if epoch is not None:
            return int(epoch)
    return None


class ResumableLoader:
    """A training DataLoader that a run resumed within an epoch (``resume``) continues with the next
    batch of that epoch's order: the samplers draw an epoch's order from ``(seed, epoch)`` alone, and
    the batches already trained are skipped without being loaded. Iterating starts at the first batch,
    not at ``iter()``: Lightning creates a resumed run's first iterator before it sets the sampler's
    epoch, and a loader with workers draws its first indices as soon as its iterator exists."""

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches done) for the next iteration

    @property
    def sampler(self) -> Any:  # Lightning sets each epoch on these
        return self.loader.sampler

    @property
    def batch_sampler(self) -> Any:
        return self.loader.batch_sampler

    def __len__(self) -> int:
        return len(self.loader)

    def resume(self, epoch: int, batches_done: int) -> None:
        self.resume_at = (int(epoch), int(batches_done))

    def __iter__(self) -> Iterator[Any]:
        return self.batches()

    def batches(self) -> Iterator[Any]:
        resume, self.resume_at = self.resume_at, None
        epoch = sampler_epoch(self.loader)
        skip = resume[1] if resume is not None and epoch in (None, resume[0]) else 0
        yield from loader_starting_at(self.loader, skip) if skip else self.loader


def resumable(make_loader: Any) -> ResumableLoader:
    return ResumableLoader(make_loader())


@contextmanager
def resumable_training_loader(data: L.LightningDataModule) -> Iterator[None]:
    """``data.train_dataloader()`` returns its loader wrapped in a ResumableLoader while the block runs."""
    before = vars(data).get("train_dataloader")
    data.train_dataloader = functools.partial(resumable, data.train_dataloader)  # type: ignore[method-assign]
    try:
        yield
    finally:
        if before is None:
            del data.train_dataloader
        else:
            data.train_dataloader = before  # type: ignore[method-assign]


class RunLog(Logger):
    """Every row the run logs, appended to ``<ckpt_dir>/log.jsonl`` as it is logged (rank 0). A resumed
    run logs again the rows of the part of the run its checkpoint holds into its other loggers, so its
    CSV log (the report's learning curves) and TensorBoard events cover the whole run: Lightning's CSV
    logger starts its file afresh, DVC deletes the folder, and a kill loses the rows not yet flushed.
    (A kill in the instant between an epoch's checkpoint and the epoch's training row loses that row.)"""

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @property
    def name(self) -> str:
        return "run_log"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        row = {"step": step, **{k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}}
        with self.path.open("a") as file:
            file.write(json.dumps(row) + "\n")

    def rows_until(self, position: dict[str, Any]) -> list[dict[str, Any]]:
        """The rows logged up to a checkpoint's position: its finished epochs' rows, and within the epoch
        it stopped in, step rows before its step."""
        rows = []
        for line in self.path.read_text().splitlines() if self.path.exists() else ():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line the kill cut short
                continue
            epoch = row.get("epoch", -1)
            if epoch < position["epoch"] or (epoch == position["epoch"] and (
                    position["epoch_done"] or (row.get("step") or 0) < position["global_step"])):
                rows.append(row)
        return rows

    def restore(self, trainer: L.Trainer, position: dict[str, Any]) -> None:
        """Log the rows up to ``position`` into the trainer's other loggers, and keep only them here."""
        rows = self.rows_until(position)
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in rows))
        for row in rows:
            step = row.pop("step")
            for logger in trainer.loggers:
                if logger is not self:
                    logger.log_metrics(row, step)


class ResumeCheckpoint(Checkpoint):
    """Writes ``last.ckpt``, what an interrupted run resumes from: at the end of every training epoch
    (after validation; Lightning runs checkpoint callbacks last, so early stopping's and the best
    checkpoint's state for the epoch are in it), and within an epoch once ``every_s`` seconds
    (default ``CHECKPOINT_EVERY_S``) have passed since the last write, rank 0's clock deciding for every
    rank. A resumed run says on stderr where it continues; ``summary`` shows each epoch's line once its
    checkpoint is written."""

    def __init__(self, ckpt_dir: Path, label: str, every_s: float | None = None,
                 summary: EpochSummary | None = None):
        self.path = Path(ckpt_dir) / LAST_FILE
        self.run_log = RunLog(Path(ckpt_dir) / RUN_LOG_FILE)  # one of the trainer's loggers
        self.label = label
        self.summary = summary  # shown after each epoch's checkpoint
        self.every_s = CHECKPOINT_EVERY_S if every_s is None else float(every_s)
        self.written_at = time.monotonic()
        self.position: dict[str, Any] = {}  # where the checkpoint being written stands
        self.restored: dict[str, Any] | None = None  # where the checkpoint resumed from stood

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.written_at = time.monotonic()
        if self.restored is None:
            return
        # Lightning does not keep early stopping's verdict; without it a run killed after its last
        # epoch's checkpoint would train one epoch more than the uninterrupted run.
        trainer.should_stop = trainer.should_stop or bool(self.restored.get("should_stop"))
        if not self.restored.get("epoch_done"):
            loader = trainer.train_dataloader
            if not isinstance(loader, ResumableLoader):
                raise TypeError(f"resuming within an epoch needs a ResumableLoader, not {type(loader).__name__}")
            loader.resume(self.restored["epoch"], self.restored["batches"])
        if trainer.is_global_zero:
            self.run_log.restore(trainer, self.restored)
            print(f"[{self.label}] {self.resume_note(trainer)}", file=sys.stderr, flush=True)

    def resume_note(self, trainer: L.Trainer) -> str:
        at, n = self.restored or {}, trainer.max_epochs
        epoch, batches = int(at.get("epoch", 0)), int(at.get("batches") or 0)
        if not at.get("epoch_done"):
            return (f"resuming from {self.path} within epoch {epoch + 1}/{n}: batches 1-{batches} of "
                    f"{at.get('epoch_batches', '?')} done, continuing with batch {batches + 1}")
        if at.get("should_stop") or (n is not None and n >= 0 and epoch + 1 >= n):
            return (f"resuming from {self.path}: training had ended after epoch {epoch + 1}/{n}, "
                    "nothing left to train")
        left = f"epoch {n}/{n}" if epoch + 2 == n else f"epochs {epoch + 2}-{n} of {n}"
        return f"resuming from {self.path} after epoch {epoch + 1}/{n}: training {left}"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's end writes one next
        due = time.monotonic() - self.written_at >= self.every_s
        if trainer.world_size > 1:
            due = trainer.strategy.broadcast(due, src=0)
        if due:
            self.write(trainer, batches_done=batch_idx + 1)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer, batches_done=None)
        if self.summary is not None:
            self.summary.show(trainer)

    def write(self, trainer: L.Trainer, batches_done: int | None) -> None:
        """Write last.ckpt: within the epoch after ``batches_done`` batches, or (None) at its end."""
        self.position = {"epoch": int(trainer.current_epoch), "epoch_done": batches_done is None,
                         "batches": batches_done, "epoch_batches": trainer.num_training_batches,
                         "global_step": int(trainer.global_step), "should_stop": bool(trainer.should_stop)}
        trainer.save_checkpoint(self.path)
        self.written_at = time.monotonic()

    def state_dict(self) -> dict[str, Any]:
        return dict(self.position)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.restored = dict(state_dict)
