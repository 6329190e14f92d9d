"""Fine-tuning throughput, images/s: training and inference of the finetune network (vgg16_bn conv
base + dense head, pipeline.models) at bf16 + channels_last on a GPU, eager and torch.compile'd, and
which side bounds training: the data loader (JPEG decode + augmentation, pipeline.data) or the model.

    python benchmarks/train_throughput.py                               # vgg16_bn, 224 px, GPU if any
    python benchmarks/train_throughput.py --arch vgg16_bn_narrow --size 64 --batches 3   # CPU smoke

Three timings of the same batches: the loader alone (batches/s out of the DataLoader), the model
alone (one uint8 batch already on the device, train step = forward + backward + SGD step), and both
together (the real loop). ``bound`` says which is slower; "loader" means more workers or a faster
decode would help, "model" that the accelerator is the limit. Synthetic 640x480 JPEGs (the State Farm
frame size) are written to a temp folder unless ``--images DIR`` points at real ones. Warm-up batches
(worker start, cuDNN autotune, compilation) are excluded; compile time is reported separately.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from pipeline.config import AugmentConfig, ModelConfig
from pipeline.data import ImageRowsDataset, build_augmentation, seed_worker
from pipeline.models import (
    ConvNet,
    create_backbone,
    create_conv_base,
    create_dense_head,
    resolve_preprocessing,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=["vgg16_bn", "vgg16_bn_narrow"], default="vgg16_bn")
    parser.add_argument("--width-divisor", type=int, default=8, help="channels divisor for vgg16_bn_narrow")
    parser.add_argument("--size", type=int, default=224, help="square input size in pixels")
    parser.add_argument("--batch-size", type=int, default=64 if cuda else 16)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--compile", choices=["auto", "on", "off", "both"], default="auto",
                        help="auto: eager and compiled on CUDA, eager only on CPU")
    parser.add_argument("--deterministic", action="store_true",
                        help="as the finetune trainer's deterministic: warn (deterministic algorithms, no cuDNN "
                             "autotune); default: cuDNN autotune on")
    parser.add_argument("--images", type=Path, help="folder of JPEGs to read (default: synthetic 640x480)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------- inputs


def write_frames(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """640x480 JPEGs with gradients and noise (roughly a real frame's size and decode cost)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:480, 0:640]
    paths = []
    for i in range(n):
        base = np.stack([(x * 0.3 + 7 * i) % 255, (y * 0.4 + 3 * i) % 255, ((x + y) * 0.2) % 255], axis=-1)
        pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"frame_{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def build_loader(paths: list[Path], size: int, batch_size: int, workers: int, augment: bool) -> DataLoader:
    """The fine-tune stage's train loader (augmented copies) or its inference loader (plain)."""
    n = batch_size * 1000  # long enough never to run out; rows cycle over the files
    cycled = [paths[i % len(paths)] for i in range(n)]
    copies = np.ones(n, dtype=np.int64) if augment else None
    dataset = ImageRowsDataset(cycled, (size, size), labels=np.arange(n) % 10, copies=copies,
                               augmentation=build_augmentation(AugmentConfig()) if augment else None)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, worker_init_fn=seed_worker,
                      pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      prefetch_factor=4 if workers else None)


def build_network(args: argparse.Namespace, device: torch.device) -> ConvNet:
    """The finetune network (every block trainable: the slowest stage of staged unfreezing)."""
    model_cfg = ModelConfig(arch=args.arch, width_divisor=args.width_divisor, weights="none",
                            input_size=(args.size, args.size))
    backbone = create_backbone(model_cfg)
    conv_base = create_conv_base(backbone, resolve_preprocessing(backbone, model_cfg), grid=2, frozen=False)
    network = ConvNet(conv_base, create_dense_head(conv_base.out_features, [512, 512])).to(device).train()
    if device.type == "cuda":
        network = network.to(memory_format=torch.channels_last)
    return network


# ---------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else images


def make_steps(model: nn.Module, device: torch.device) -> tuple[Callable[[torch.Tensor, torch.Tensor], None],
                                                              Callable[[torch.Tensor], None]]:
    """A train step (forward, backward, SGD step) and an inference step, bf16 autocast on CUDA."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    amp = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def train_step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with torch.autocast(**amp):
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def infer_step(images: torch.Tensor) -> None:
        with torch.autocast(**amp):
            model(images)

    return train_step, infer_step


def timed(step: Callable[[], None], batches: int, warmup: int, batch_size: int, device: torch.device) -> dict[str, float]:
    """images/s over ``batches`` calls after ``warmup`` untimed ones (whose time is reported too)."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm = time.perf_counter()
    for _ in range(batches):
        step()
    sync(device)
    seconds = time.perf_counter() - warm
    return {"images_per_s": round(batches * batch_size / seconds, 1), "warmup_s": round(warm - start, 2)}


def loader_step(batches: Iterator[Any]) -> Callable[[], None]:
    return lambda: next(batches)


def measure(args: argparse.Namespace, device: torch.device, paths: list[Path], compiled: bool) -> dict[str, Any]:
    network = build_network(args, device)
    model: nn.Module = torch.compile(network) if compiled else network
    train_step, infer_step = make_steps(model, device)
    bs = args.batch_size
    images = to_device(torch.randint(0, 256, (bs, 3, args.size, args.size), dtype=torch.uint8), device)
    labels = torch.randint(0, 10, (bs,), device=device)
    out: dict[str, Any] = {"model_train": timed(lambda: train_step(images, labels), args.batches, args.warmup, bs, device)}
    train_batches = iter(build_loader(paths, args.size, bs, args.workers, augment=True))

    def together() -> None:
        batch_images, batch_labels = next(train_batches)
        train_step(to_device(batch_images, device), batch_labels.to(device, non_blocking=True))

    out["together_train"] = timed(together, args.batches, args.warmup, bs, device)
    network.eval()  # inference as the stages predict: batchnorm on running statistics, no dropout
    out["model_infer"] = timed(lambda: infer_step(images), args.batches, args.warmup, bs, device)
    model_ips, together_ips = out["model_train"]["images_per_s"], out["together_train"]["images_per_s"]
    out["together_vs_model"] = round(together_ips / model_ips, 3)
    return out


def bound(loader_ips: float, model_ips: float) -> str:
    return "loader" if loader_ips < model_ips else "model"


def compile_modes(choice: str, device: torch.device) -> list[bool]:
    if choice == "auto":
        return [False, True] if device.type == "cuda" else [False]
    return {"on": [True], "off": [False], "both": [False, True]}[choice]


def run(args: argparse.Namespace, paths: list[Path]) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.deterministic:  # what Lightning does for Trainer(deterministic="warn")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "arch": args.arch, "size": args.size, "batch_size": args.batch_size, "workers": args.workers,
        "precision": "bf16-mixed" if device.type == "cuda" else "32-true",
        "channels_last": device.type == "cuda", "deterministic": args.deterministic, "torch": torch.__version__,
    }
    bs = args.batch_size
    for name, augment in (("loader_train", True), ("loader_infer", False)):
        batches = iter(build_loader(paths, args.size, bs, args.workers, augment))
        results[name] = timed(loader_step(batches), args.batches, args.warmup, bs, torch.device("cpu"))
    for compiled in compile_modes(args.compile, device):
        key = "compiled" if compiled else "eager"
        try:
            results[key] = measure(args, device, paths, compiled)
        except Exception as err:  # e.g. no C++ compiler for inductor: report, keep the other figures
            results[key] = {"error": f"{type(err).__name__}: {err}"[:500]}
            continue
        loader_ips = results["loader_train"]["images_per_s"]
        results[key]["train_bound"] = bound(loader_ips, results[key]["model_train"]["images_per_s"])
    return results


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = [f"{results['arch']} {results['size']}px batch {results['batch_size']} on {results['device']} "
             f"({results['precision']}, channels_last={results['channels_last']}, deterministic={results['deterministic']}, "
             f"{results['workers']} workers)",
             f"  loader alone: train (augmented) {results['loader_train']['images_per_s']} img/s, "
             f"inference {results['loader_infer']['images_per_s']} img/s"]
    for key in ("eager", "compiled"):
        r = results.get(key)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"  {key}: failed: {r['error']}")
            continue
        lines.append(f"  {key}: model train {r['model_train']['images_per_s']} img/s, inference "
                     f"{r['model_infer']['images_per_s']} img/s, together {r['together_train']['images_per_s']} img/s "
                     f"-> {r['train_bound']}-bound (warm-up {r['model_train']['warmup_s']} s)")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.images is not None:
            paths = sorted(itertools.islice(args.images.rglob("*.jpg"), 512))
            if not paths:
                print(f"no .jpg files under {args.images}", file=sys.stderr)
                return 2
        else:
            paths = write_frames(Path(tmp), min(128, args.batch_size * (args.batches + args.warmup)))
        results = run(args, paths)
    for line in summary_lines(results):
        print(line, file=sys.stderr)
    print(json.dumps(results, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
