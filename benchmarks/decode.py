"""JPEG decode to model input, images/s per core: the plain baseline vs pipeline.data, side by side.

    python benchmarks/decode.py                      # generates 64 photo-like 640x480 JPEGs
    python benchmarks/decode.py --dir data/raw/imgs/train/c0 --size 224 224 --n 200

Pinned to one core (``sched_setaffinity``, one torch/OpenCV thread), the methods are timed in
interleaved rounds over the same files and the best round of each counts (the machine is shared).

- baseline: PIL full decode + torchvision ``Resize((h, w))`` (anti-aliased) + ``PILToTensor`` (uint8)
- baseline+float: the same + ``ToTensor`` + ``Normalize`` on the CPU (the usual torchvision recipe)
- reduced: ``pipeline.data.decode_image`` (libjpeg reduced-DCT decode at 1/2, 1/4 or 1/8 straight to
  near the target, then one small bilinear step) + uint8 CHW tensor; normalisation happens on the
  model's device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from pipeline.data import decode_image, to_chw_tensor


def write_photo_like_jpegs(folder: Path, n: int, width: int = 640, height: int = 480, seed: int = 0) -> list[Path]:
    """Smooth gradients, shapes, blur and sensor-like noise: about the size (~40-50 KB) and entropy
    of a State Farm frame at quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    paths = []
    for i in range(n):
        base = np.stack([(x * 0.3 + 7 * i) % 255, (y * 0.4 + 3 * i) % 255, ((x + y) * 0.2) % 255], axis=-1)
        image = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
        image = image.filter(ImageFilter.GaussianBlur(1))
        draw = ImageDraw.Draw(image)
        for _ in range(20):
            x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            draw.ellipse([x0, y0, x0 + int(rng.integers(10, 120)), y0 + int(rng.integers(10, 120))],
                         fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        path = folder / f"img_{i}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def pin_to_one_core() -> int | None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if hasattr(os, "sched_setaffinity"):
        core = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {core})
        return core
    return None


def methods(target_hw: tuple[int, int]) -> dict[str, Callable[[Path], torch.Tensor]]:
    import torchvision.transforms as T

    resize_uint8 = T.Compose([T.Resize(target_hw, antialias=True), T.PILToTensor()])
    resize_float = T.Compose([T.Resize(target_hw, antialias=True), T.ToTensor(),
                              T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return {
        "baseline": lambda p: resize_uint8(Image.open(p).convert("RGB")),
        "baseline+float": lambda p: resize_float(Image.open(p).convert("RGB")),
        "reduced": lambda p: to_chw_tensor(decode_image(p, target_hw)),
    }


def time_rounds(fns: dict[str, Callable[[Path], torch.Tensor]], paths: list[Path], rounds: int) -> dict[str, list[float]]:
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm up (imports, page cache)
        for p in paths[:4]:
            fn(p)
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for p in paths:
                fn(p)
            seconds[name].append((time.perf_counter() - start) / len(paths))
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="folder of JPEGs (default: generate photo-like 640x480 ones)")
    parser.add_argument("--n", type=int, default=64, help="images (default 64)")
    parser.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"), help="model input (224 224)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    core = pin_to_one_core()
    with tempfile.TemporaryDirectory() as tmp:
        if args.dir:
            paths = sorted(args.dir.glob("*.jpg"))[: args.n]
        else:
            paths = write_photo_like_jpegs(Path(tmp), args.n)
        if not paths:
            raise SystemExit(f"no .jpg files in {args.dir}")
        w, h = Image.open(paths[0]).size
        kb = statistics.mean(p.stat().st_size for p in paths) / 1024
        seconds = time_rounds(methods(tuple(args.size)), paths, args.rounds)

    best = {name: min(s) for name, s in seconds.items()}
    print(f"{len(paths)} JPEGs {w}x{h}, {kb:.0f} KB mean -> {args.size[0]}x{args.size[1]} uint8; one core (cpu {core}), "
          f"best of {args.rounds} interleaved rounds")
    print(f"{'method':<16}{'ms/img':>8}{'img/s/core':>12}")
    for name, s in best.items():
        print(f"{name:<16}{s * 1e3:>8.2f}{1 / s:>12.0f}")
    ratio = best["baseline"] / best["reduced"]
    ratio_float = best["baseline+float"] / best["reduced"]
    print(f"ratio reduced vs baseline: {ratio:.2f}x per core (vs baseline+float: {ratio_float:.2f}x)")
    figures = {"images": len(paths), "source_size": [w, h], "mean_kb": round(kb, 1), "target": list(args.size),
               "ms_per_image": {k: round(v * 1e3, 3) for k, v in best.items()},
               "images_per_s_per_core": {k: round(1 / v, 1) for k, v in best.items()},
               "ratio_vs_baseline": round(ratio, 2), "ratio_vs_baseline_float": round(ratio_float, 2)}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
