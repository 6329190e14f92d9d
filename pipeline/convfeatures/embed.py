"""Forward passes over batches of images, shared by the stages and the code-competition notebook
(``pipeline.kernel.predict``) so both give the same values for the same images: the frozen conv base as
fp16 features (what the ``features`` stage caches, ``pipeline.convfeatures.extract``) and a whole network's
softmax probabilities (``pipeline.training.prediction``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline.errors import StageError

FP16_MAX = float(np.finfo(np.float16).max)


def resolve_device(device: str) -> torch.device:
    """The torch device for ``features.device``; a StageError when it is not available here, so a run
    that cannot compute fails before it touches the cache."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            raise StageError(f"features.device is {device} but this machine has {count} CUDA device(s): "
                             "set features.device to auto or cpu")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise StageError(f"features.device is {device} but MPS is not available on this machine: "
                         "set features.device to auto or cpu")
    return resolved


@torch.no_grad()
def embed_batches(conv_base: torch.nn.Module, loader: DataLoader, device: torch.device) -> Iterator[np.ndarray]:
    """fp16 features per batch (autocast fp16 on CUDA, fp32 on CPU), clipped to the fp16 range."""
    use_cuda = device.type == "cuda"
    for images, _labels in loader:
        images = images.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_cuda):
            out = conv_base(images)
        yield out.float().clamp_(-FP16_MAX, FP16_MAX).to(torch.float16).cpu().numpy()


@torch.no_grad()
def softmax_batches(network: torch.nn.Module, loader: DataLoader, device: torch.device, channels_last: bool) -> np.ndarray:
    """Softmax probabilities (float64) of every batch of ``loader``, bf16 autocast on CUDA; channels-last
    input where ``channels_last``. ``(0, 0)`` for an empty loader."""
    cuda = device.type == "cuda"
    out = []
    for images, _ in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = network(images)
        out.append(torch.nn.functional.softmax(logits.float(), dim=1).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))
