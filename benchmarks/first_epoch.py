"""Does fine-tuning's first, low-learning-rate epoch leave the network where the head left it? Per seed,
holdout mode: the head's predictions on the validation drivers against finetune's after exactly one
epoch (``finetune.max_epochs=1``, no TTA), row by row. Printed: the relative change in log loss, and
the paired standard error of the change (the standard deviation of the per-row differences over
sqrt(n)), so a change reads against the noise of a few hundred validation images: ``z`` > 2 is a
change the validation set can tell from noise.

    python benchmarks/first_epoch.py --seeds 0 1 2 3 4 5 6 7 [--profile demo] [--workdir DIR] [--out F.json]

The runs share ``benchmarks/ensemble_seeds.py``'s layout: with the same ``--workdir`` its shared data,
feature cache and pretrained backbone are reused (and made first when missing).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.competition import read_competition
from pipeline.config import Config, load_profile
from pipeline.metrics import row_logloss
from pipeline.outoffold import aligned, read_held_out

FIRST_EPOCH_ONLY = ("finetune.max_epochs=1", "ensemble.tta=0", "split.validation=holdout")


def held_out_predictions(cfg: Config, models: tuple[str, ...]) -> tuple[list[np.ndarray], np.ndarray]:
    """Fold 0's held-out (validation) rows: each model's predictions, in one row order, and the labels."""
    classes = list(read_competition(cfg.paths.path("raw")).classes)
    held = read_held_out(cfg, classes)
    folds = cfg.paths.path("predictions") / "folds"
    return [aligned(folds / model / "0" / "oof.csv", held.ids, classes, model) for model in models], held.labels


def paired_change(head: np.ndarray, tuned: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """``tuned``'s log loss against ``head``'s on the same rows: relative change, and its z (the mean
    per-row difference over its standard error)."""
    head_rows = row_logloss(head, labels)
    diff = row_logloss(tuned, labels) - head_rows
    base, mean = float(head_rows.mean()), float(diff.mean())
    se = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    return {"rows": len(diff), "head": base, "first_epoch": base + mean, "change": mean / base,
            "z": mean / se if se else 0.0, "se_relative": se / base}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    # ensemble_seeds' layout and runner (benchmarks/ is on the path when this runs as a script)
    from ensemble_seeds import FIRST_EPOCH_TOLERANCE, SHARED, link_shared, run_stages

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        shared = load_profile(args.profile, [*args.overrides, "split.validation=cv"]).at(work / "shared")
        if not (shared.paths.path("models") / "pretrain").exists():
            run_stages(shared, SHARED)
        results = {}
        for seed in args.seeds:
            seeded = [f"{section}.seed={seed}" for section in ("split", "head", "finetune")]
            cfg = load_profile(args.profile, [*args.overrides, *seeded, *FIRST_EPOCH_ONLY]).at(work / f"first_epoch{seed}")
            link_shared(shared, cfg)
            run_stages(cfg, ("split", "head", "finetune"))
            (head, tuned), labels = held_out_predictions(cfg, ("head", "finetune"))
            results[seed] = row = paired_change(head, tuned, labels)
            print(f"seed {seed}: head {row['head']:.4f} -> first epoch {row['first_epoch']:.4f} "
                  f"({row['change']:+.2%}, paired SE {row['se_relative']:.2%}, z {row['z']:+.2f}; {row['rows']} rows)", flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    changes = [r["change"] for r in results.values()]
    print(f"changes: {' '.join(f'{c:+.2%}' for c in changes)}; within {FIRST_EPOCH_TOLERANCE:.0%}: "
          f"{sum(c <= FIRST_EPOCH_TOLERANCE for c in changes)} of "
          f"{len(changes)}; z <= 2 (not told from noise): {sum(r['z'] <= 2 for r in results.values())} of {len(changes)}")


if __name__ == "__main__":
    main()
