"""How long does a competitor wait from raw data to submission, and which stage holds it up? The
``statefarm`` profile end to end on the synthetic data at State Farm's real counts and resolution
(22,424-ish train frames of 26 drivers, 79,726 test, 640x480 JPEG; generated once and cached in the
work folder), with the real ``vgg16_bn`` (random weights: no accuracy claim), one stage at a time as
its own process, as DVC runs it. Per stage: wall time, images per second, peak resident memory of
the stage's process tree, CPU use, and on CUDA the mean GPU utilisation and peak GPU memory, with what
bounds it (a heuristic from those: GPU busy -> GPU; cores busy and GPU idle -> loader/CPU; neither ->
Python/disk).

    python benchmarks/full_chain.py [--size full|reduced] [--workdir DIR] [--set KEY=VALUE ...] [--out results.json]

``--size reduced`` (the default on a machine without CUDA) shrinks the data to the demo's counts and the
model to the narrow VGG, so the script itself is exercised on CPU (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from pipeline.config import load_profile, write_params
from pipeline.io import read_json
from pipeline.registry import STAGES

ROOT = Path(__file__).resolve().parent.parent
SKIPPED = ("sample", "submit", "report")  # not on the path from data to a scored submission's files
FULL = ["ingest.source=synthetic", "model.weights=none"]
REDUCED = [*FULL, "ingest.synthetic.n_train_drivers=12", "ingest.synthetic.n_test_drivers=4",
           "ingest.synthetic.train_per_driver=[30, 40]", "ingest.synthetic.n_test=200", "ingest.synthetic.width=160",
           "ingest.synthetic.height=120", "model.arch=vgg16_bn_narrow", "model.width_divisor=8", "model.input_size=[96, 128]",
           "split.n_folds=3", "features.copies=2", "features.num_workers=0", "features.device=cpu", "features.batch_size=32",
           "finetune.max_epochs=1", "finetune.num_workers=0", "finetune.trainer.accelerator=cpu",
           "finetune.trainer.precision=32-true", "pseudo.max_epochs=1", "ensemble.members=1", "ensemble.tta=1"]


class Sampler:
    """Polls a process tree's resident memory and CPU use, and the GPU's utilisation and memory."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.cpu: list[float] = []
        self.gpu_util: list[float] = []
        self.gpu_mem_peak = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)

    def tree(self) -> list[psutil.Process]:
        try:
            return [self.process, *self.process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def poll(self) -> None:
        while not self.stop.is_set():
            procs = self.tree()
            rss, cpu = 0, 0.0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    cpu += p.cpu_percent(None)
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self.cpu.append(cpu)
            self.poll_gpu()
            self.stop.wait(self.interval)

    def poll_gpu(self) -> None:
        if not shutil.which("nvidia-smi"):
            return
        out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True).stdout.splitlines()
        if out:
            util, mem = (float(v) for v in out[0].split(","))
            self.gpu_util.append(util)
            self.gpu_mem_peak = max(self.gpu_mem_peak, mem)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def bound(cpu_mean: float, cores: int, gpu_util: float | None) -> str:
    if gpu_util is not None and gpu_util >= 70:
        return "GPU"
    if cpu_mean >= 70 * cores:
        return "loader/CPU"
    return "Python/disk" if gpu_util is None or gpu_util < 30 else "mixed"


def images_processed(stage: str, figures: dict[str, Any]) -> float | None:
    """Images the stage pushed through its model (or wrote), from its own figures."""
    if stage == "features":
        return sum(v for k, v in figures.items() if k.startswith("n_") and k.endswith("_rows"))
    if stage == "ingest":
        return figures.get("n_train", 0) + figures.get("n_test", 0) or None
    trained = figures.get("n_train_images", 0) * figures.get("epochs", 0)  # model stages: training images seen
    return trained or None


def stage_figures(cfg, stage: str) -> list[dict[str, Any]]:
    folder = cfg.paths.path("stage_metrics")
    return [read_json(p) for p in sorted(folder.glob(f"{stage}*.json")) if p.stem == stage or p.stem.startswith(f"{stage}@")]


def run_stage(stage: str, params: Path, cwd: Path) -> tuple[float, Sampler]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", stage, "--params", str(params)], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    with Sampler(proc.pid) as sampler:
        _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"stage {stage} failed:\n{err[-2000:]}")
    return time.perf_counter() - start, sampler


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["full", "reduced"], default="full" if torch.cuda.is_available() else "reduced")
    parser.add_argument("--workdir", type=Path, default=ROOT / ".benchmarks" / "full_chain")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    work = args.workdir / args.size
    work.mkdir(parents=True, exist_ok=True)
    cfg = load_profile("statefarm", [*(FULL if args.size == "full" else REDUCED), *args.overrides]).at(work)
    params = write_params(cfg, work / "params.yaml")
    cores = psutil.cpu_count() or 1
    rows, total = [], 0.0
    for stage in (s for s in STAGES if s not in SKIPPED):
        if stage == "ingest" and (cfg.paths.path("raw") / "competition.json").exists():
            rows.append({"stage": stage, "seconds": 0.0, "note": "cached from an earlier run"})
            continue
        seconds, sampler = run_stage(stage, params, work)
        total += seconds
        figures = stage_figures(cfg, stage)
        images = sum(filter(None, (images_processed(stage, f) for f in figures))) or None
        cpu_mean = sum(sampler.cpu) / max(len(sampler.cpu), 1)
        gpu = sum(sampler.gpu_util) / len(sampler.gpu_util) if sampler.gpu_util else None
        rows.append({"stage": stage, "seconds": round(seconds, 1), "images_per_s": round(images / seconds, 1) if images else None,
                     "peak_rss_gb": round(sampler.peak_rss / 2**30, 2), "cpu_percent": round(cpu_mean),
                     "gpu_util_percent": None if gpu is None else round(gpu), "peak_gpu_mem_gb":
                     round(sampler.gpu_mem_peak / 1024, 2) if sampler.gpu_util else None,
                     "bound": bound(cpu_mean, cores, gpu)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n| stage | s | images/s | peak RSS GB | CPU % ({cores} cores) | GPU % | peak GPU GB | bound |\n|" + " --- |" * 8)
    for r in rows:
        print(f"| {r['stage']} | {r['seconds']} | {r.get('images_per_s') or ''} | {r.get('peak_rss_gb', '')} | "
              f"{r.get('cpu_percent', '')} | {r.get('gpu_util_percent') or ''} | {r.get('peak_gpu_mem_gb') or ''} | "
              f"{r.get('bound', r.get('note', ''))} |")
    print(f"total: {total:.0f} s ({args.size}, profile statefarm)")
    if args.out:
        args.out.write_text(json.dumps({"size": args.size, "total_seconds": total, "stages": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
