"""The one checkpoint format of every stage's network (``{"state_dict", "meta"}``: pretrain backbone,
dense head, fine-tuned CNN), and Lightning's own checkpoints: written atomically
(``AtomicCheckpointIO``), checked before they are trusted (``checkpoint_problem``)."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins import TorchCheckpointIO
from torch import nn

from pipeline.errors import StageError
from pipeline.io import atomic_path, atomic_write_bytes

MODEL_FILE = "model.pt"
LAST_FILE = "last.ckpt"
BEST_FILE = "best.ckpt"


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer made atomic: a checkpoint goes to a temp file next to its target,
    is flushed to disk and renamed onto it, so a kill mid-write leaves the previous checkpoint whole."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_path(path) as tmp, open(tmp, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())


def checkpoint_problem(path: Path) -> str | None:
    """Why a Lightning checkpoint cannot be trusted (None: it can): missing, not a whole torch archive
    (cut short by a full disk, or by a kill mid-write of a writer without ``AtomicCheckpointIO``), a
    record whose bytes fail the archive's CRC-32, or contents that do not unpickle into a checkpoint.
    Reads the file once; the tensors are mapped, not loaded."""
    if not path.exists():
        return "is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "is not a torch archive"
            damaged = archive.testzip()
        if damaged is not None:
            return f"is damaged (record {damaged} fails its checksum)"
        blob = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # as Lightning loads it
    except Exception as err:  # a cut or foreign file: zipfile and torch raise several kinds
        return f"does not load ({type(err).__name__}: {err})"
    if not isinstance(blob, dict) or "state_dict" not in blob:
        return "is not a Lightning checkpoint (no state_dict)"
    return None


def checkpoint_loads(path: Path) -> bool:
    return checkpoint_problem(path) is None
