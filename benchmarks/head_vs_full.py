"""One training epoch of the dense head on cached features vs one epoch through the whole network
(conv base + head, forward + backward + optimiser step) on the same images, side by side.

    python benchmarks/head_vs_full.py                               # narrow VGG, 96x128, CPU
    python benchmarks/head_vs_full.py --arch vgg16_bn --size 224 224 --images 256 --device cuda

Decoding is left out of both sides (the images are already uint8 tensors in memory), which favours
the full network: with decode included the ratio only grows. The head side uses the head stage's
own pieces (``FeatureBatches`` + ``RandomCopyBatches`` over fp16 features, ``create_dense_head``,
``create_optimizer``); the full side is ``ConvNet`` with a trainable conv base. Each side runs one
warm-up epoch, then the best of ``--repeats`` timed epochs counts.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipeline.config import HeadConfig, ModelConfig
from pipeline.models import (
    ConvNet,
    create_backbone,
    create_conv_base,
    create_dense_head,
    resolve_preprocessing,
)
from pipeline.training.datamodules import FeatureBatches, RandomCopyBatches
from pipeline.training.optim import TrainSettings, create_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_seconds(epoch: Callable[[], None], device: torch.device, repeats: int) -> float:
    epoch()  # warm-up: allocator, kernels, autotuning
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        epoch()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def cache_features(model_cfg: ModelConfig, images: torch.Tensor, grid: int, batch: int, device: torch.device) -> torch.Tensor:
    backbone = create_backbone(model_cfg)
    base = create_conv_base(backbone, resolve_preprocessing(backbone, model_cfg), grid).to(device)
    return torch.cat([base(images[i:i + batch].to(device)).half().cpu() for i in range(0, len(images), batch)])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("vgg16_bn_narrow", "vgg16_bn"), default="vgg16_bn_narrow")
    parser.add_argument("--width-divisor", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"))
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--grid", type=int, default=2)
    parser.add_argument("--widths", type=int, nargs="*", default=[512, 512])
    parser.add_argument("--full-batch", type=int, default=32, help="end-to-end batch (finetune default 32)")
    parser.add_argument("--head-batch", type=int, default=128, help="head batch (head default 128)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: per-core figures; OpenMP with 2 threads on a busy 2-core box is erratic)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_cfg = ModelConfig(arch=args.arch, width_divisor=args.width_divisor, weights="none", input_size=tuple(args.size))
    head_cfg = HeadConfig(widths=args.widths)
    images = torch.randint(0, 256, (args.images, 3, *args.size), dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.images,))

    # Head on the cache: features computed once (what the features stage does), then epochs.
    feats = cache_features(model_cfg, images, args.grid, args.full_batch, device)
    head = create_dense_head(feats.shape[1], head_cfg.widths, head_cfg.dropout).to(device).train()
    head_opt = create_optimizer([{"params": list(head.parameters())}], TrainSettings.from_section(head_cfg))
    loader = DataLoader(FeatureBatches(feats, labels, n_classes=10), batch_size=None,
                        sampler=RandomCopyBatches(torch.arange(args.images).view(-1, 1), args.head_batch))

    def head_epoch() -> None:
        for batch in loader:
            loss = F.cross_entropy(head(batch["input"].to(device)), batch["label"].to(device))
            head_opt.zero_grad(set_to_none=True)
            loss.backward()
            head_opt.step()

    # The whole network, trainable conv base + the same head, on the same images.
    backbone = create_backbone(model_cfg)
    conv_base = create_conv_base(backbone, resolve_preprocessing(backbone, model_cfg), args.grid, frozen=False)
    full = ConvNet(conv_base, create_dense_head(conv_base.out_features, head_cfg.widths, head_cfg.dropout)).to(device).train()
    full = full.to(memory_format=torch.channels_last)
    full_opt = create_optimizer([{"params": list(full.parameters())}], TrainSettings.from_section(head_cfg))

    def full_epoch() -> None:
        order = torch.randperm(args.images)
        for i in range(0, args.images, args.full_batch):
            idx = order[i:i + args.full_batch]
            loss = F.cross_entropy(full(images[idx].to(device)), labels[idx].to(device))
            full_opt.zero_grad(set_to_none=True)
            loss.backward()
            full_opt.step()

    head_s = best_seconds(head_epoch, device, args.repeats)
    full_s = best_seconds(full_epoch, device, args.repeats)
    ratio = full_s / head_s
    name = args.arch + (f"/{args.width_divisor}" if args.arch == "vgg16_bn_narrow" else "")
    print(f"{args.images} images {args.size[0]}x{args.size[1]}, {name}, grid {args.grid} -> {feats.shape[1]} features, "
          f"head {args.widths}, device {device}, torch threads {torch.get_num_threads()}")
    print(f"{'epoch':<28}{'seconds':>10}{'img/s':>10}")
    print(f"{'head on cached features':<28}{head_s:>10.4f}{args.images / head_s:>10.0f}")
    print(f"{'whole network (fwd+bwd)':<28}{full_s:>10.4f}{args.images / full_s:>10.0f}")
    print(f"ratio: the head's epoch is {ratio:.0f}x faster")
    figures = {"arch": name, "images": args.images, "size": list(args.size), "device": str(device),
               "head_epoch_s": round(head_s, 5), "full_epoch_s": round(full_s, 4), "ratio": round(ratio, 1)}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
