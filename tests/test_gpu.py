"""The CUDA paths: fp16 feature caching, bf16-mixed + channels_last fine-tuning and the real
vgg16_bn under bf16. Skipped where no CUDA device exists (CI, this project's dev machine); run them
on a GPU with ``pytest -m gpu``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_features import write_tiny_dataset
from test_finetune import link_inputs, prepared, tiny_cfg  # noqa: F401  (prepared is a fixture)

from pipeline.config import Config, ModelConfig
from pipeline.convfeatures import cache as featurecache
from pipeline.io import read_json
from pipeline.metrics import read_predictions
from pipeline.models import (
    ConvNet,
    create_backbone,
    create_conv_base,
    create_dense_head,
    resolve_preprocessing,
)
from pipeline.stages import features, finetune

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def on_device(cfg: Config, device: str) -> Config:
    return cfg.model_copy(update={"features": cfg.features.model_copy(update={"device": device, "copies": 2})})


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def test_cuda_feature_cache_matches_the_cpu_one(smoke_cfg, tmp_path):
    """Same rows, same augmented copies; fp16 autocast on CUDA vs fp32 on CPU agree closely."""
    caches = {}
    for device in ("cpu", "cuda"):
        cfg = on_device(smoke_cfg.at(tmp_path / device), device)
        write_tiny_dataset(cfg)
        figures = features.run(cfg)
        assert figures["device"] == device
        caches[device] = {s: featurecache.load_split(cfg.paths.path("features"), s) for s in features.SPLITS}
    for name in features.SPLITS:
        cpu, gpu = caches["cpu"][name], caches["cuda"][name]
        assert cpu.index.equals(gpu.index)
        assert gpu.features.dtype == np.float16 and np.isfinite(gpu.features).all()
        assert row_cosine(cpu.features, gpu.features).min() > 0.995, name


def test_finetune_trains_on_gpu_in_bf16_mixed(prepared, tmp_path):  # noqa: F811
    cfg = tiny_cfg(link_inputs(prepared, tmp_path), **{"finetune.trainer.accelerator": "gpu",
                                                       "finetune.trainer.precision": "auto"})
    figures = finetune.run(cfg)
    assert figures["precision"] == "bf16-mixed"
    assert figures["global_step"] == -(-30 // 8)  # 30 train images, batches of 8, one epoch
    assert math.isfinite(figures["valid_logloss"]) and math.isfinite(figures["test_logloss"])
    assert read_json(cfg.paths.stage_metrics_file("finetune")) == figures
    _, probs = read_predictions(cfg.paths.path("predictions") / "finetune" / "test.csv")
    assert np.isfinite(probs).all() and np.allclose(probs.sum(1), 1, atol=1e-4)


def test_real_vgg16_bn_trains_in_bf16_channels_last():
    """One SGD step of the real vgg16_bn (random init) + head at 224 px in bf16 autocast with
    channels_last: logits close to fp32, finite gradients everywhere, and the loss goes down."""
    model_cfg = ModelConfig(arch="vgg16_bn", weights="none")
    backbone = create_backbone(model_cfg)
    data_cfg = resolve_preprocessing(backbone, model_cfg)
    conv_base = create_conv_base(backbone, data_cfg, grid=2, frozen=False)
    torch.manual_seed(0)
    network = ConvNet(conv_base, create_dense_head(conv_base.out_features, [256], 0.0)).cuda()
    network = network.to(memory_format=torch.channels_last).train()
    images = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8, device="cuda")
    images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(8, device="cuda") % 10

    with torch.no_grad():
        network.eval()
        fp32 = network(images)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = network(images).float()
        network.train()
    assert torch.allclose(bf16, fp32, rtol=0.1, atol=0.1 * fp32.abs().max().item())

    optimiser = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.9)
    losses = []
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(network(images), labels)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in network.parameters() if p.grad is not None)
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
