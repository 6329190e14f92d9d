"""The conv base's forward pass (pipeline/convfeatures/embed.py): a device this machine lacks is refused
before anything is computed."""

from __future__ import annotations

import pytest
import torch

from pipeline.convfeatures.embed import resolve_device
from pipeline.errors import StageError


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps"])
def test_an_unavailable_device_is_a_stage_error(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(StageError, match=f"features.device is {device}"):
        resolve_device(device)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
