"""Does the pretrain stand-in transfer every time? For each pretraining seed and each float path
(intra-op thread count: a different reduction order in the conv kernels), the pretrain stage runs and
its backbone's conv features are probed on the competition's drivers (leave one driver out, nearest
class centroid: ``pipeline.probe``) against a random init's. Prints one row per run, then the spread
of the gain per float path: the margin a test may assert is one the worst run clears with room.

    python benchmarks/pretrain_transfer.py [--profile smoke] [--seeds 7919 1 2 ...] [--paths 1-thread no-onednn]
                                           [--set KEY=VALUE ...] [--workdir DIR] [--out results.json]

About 30 s a run for the smoke profile on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from pipeline.config import load_profile
from pipeline.probe import labelled_train_rows, transfer_probe
from pipeline.stages import ingest, pretrain

DEFAULT_SEEDS = (7919, 11, 23, 101, 211, 307, 401, 503)
# Each changes the rounding of every convolution, as another machine's kernels would: the thread count
# splits the reductions differently; without oneDNN, PyTorch's own conv kernels run.
FLOAT_PATHS = {"1-thread": (1, True), "2-threads": (2, True), "no-onednn": (1, False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--paths", nargs="+", default=list(FLOAT_PATHS), choices=list(FLOAT_PATHS),
                        help="float paths: intra-op threads (another reduction order) or PyTorch's own conv kernels")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pretrain-transfer-"))
    base = load_profile(args.profile, ["model.weights=pretrain", *args.overrides])
    competition = base.at(workdir / "competition")
    ingest.run(competition)
    paths, labels, groups = labelled_train_rows(competition.paths.path("raw"))
    rows = []
    for path in args.paths:
        threads, onednn = FLOAT_PATHS[path]
        torch.set_num_threads(threads)
        torch.backends.mkldnn.enabled = onednn
        random_acc = transfer_probe(base.model.model_copy(update={"weights": "none"}), base.features.grid, paths,
                                    labels, groups)
        for seed in args.seeds:
            cfg = load_profile(args.profile, ["model.weights=pretrain", f"pretrain.seed={seed}", *args.overrides])
            cfg = cfg.at(workdir / f"seed{seed}-{path}")
            start = time.perf_counter()
            figures = pretrain.run(cfg)
            acc = transfer_probe(cfg.model, cfg.features.grid, paths, labels, groups)
            row = {"float_path": path, "seed": seed, "random_acc": round(random_acc, 4), "pretrained_acc": round(acc, 4),
                   "gain": round(acc - random_acc, 4), "domain_holdout_acc": figures["holdout_acc"],
                   "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows)
    summary = table.groupby("float_path")["gain"].agg(["min", "median", "max", "count"])
    print(f"\nprofile {args.profile}, {len(args.seeds)} pretraining seeds; probe gain over random init per float path:")
    print(summary.to_string())
    print(f"worst run: gain {table['gain'].min():.3f} (pretrained {table.loc[table['gain'].idxmin(), 'pretrained_acc']:.3f})")
    if args.out:
        args.out.write_text(json.dumps({"profile": args.profile, "overrides": args.overrides, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
