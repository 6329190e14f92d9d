"""Does the ensemble beat the best single model beyond one lucky seed? The chain from `head` to
`calibrate` for several seeds (head, finetune, pseudo and so member seeds; the data, split and
feature cache are shared), side by side: hidden-test log loss of each single model, of the single
model validation would pick, of the ensemble before and after test-neighbour smoothing, and of the
calibrated output. Needs hidden labels, i.e. the synthetic data.

    python benchmarks/ensemble_seeds.py [--profile demo] [--seeds 0 1 2] [--set KEY=VALUE ...] [--workdir DIR]

The demo takes about a minute per seed on 2 CPU cores, plus about a minute for the shared stages.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.config import Config, load_profile
from pipeline.registry import stage_module

SHARED = ("ingest", "split", "pretrain", "features")
PER_SEED = ("head", "finetune", "pseudo", "member", "ensemble", "calibrate")
SINGLES = ("head", "finetune", "pseudo")
SHARED_PATHS = ("raw", "hidden", "split_csv", "features")


def run_stages(cfg: Config, names: tuple[str, ...]) -> dict[str, Any]:
    """Run the stages in order; their figures by stage (``member`` gives ``member@<m>`` figures)."""
    out: dict[str, Any] = {}
    for name in names:
        figures = stage_module(name).run(cfg)
        out.update(figures if name == "member" else {name: figures})
    return out


def link_shared(shared: Config, cfg: Config) -> None:
    """``cfg``'s project reads the shared data, split, feature cache and pretrained backbone."""
    pairs = [(shared.paths.path(p), cfg.paths.path(p)) for p in SHARED_PATHS]
    pairs.append((shared.paths.path("models") / "pretrain", cfg.paths.path("models") / "pretrain"))
    for source, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source.resolve())


def seed_row(seed: int, figures: dict[str, Any]) -> dict[str, Any]:
    singles = {s: figures[s]["test_logloss"] for s in SINGLES}
    picked = min(SINGLES, key=lambda s: figures[s]["valid_logloss"])
    ensemble = figures["ensemble"]
    best = min(singles.values())
    return {
        "seed": seed, **singles, "best single": best, "valid-picked single": singles[picked],
        "ensemble, unsmoothed": ensemble.get("smoothing_test_logloss_before", ensemble["test_logloss"]),
        "ensemble": ensemble["test_logloss"], "smoothing k": ensemble["smoothing_k"] if ensemble["smoothing_applied"] else 0,
        "calibrate": figures["calibrate"]["test_logloss"],
        "ensemble < best single": ensemble["test_logloss"] < best,
        "calibrate <= ensemble": figures["calibrate"]["test_logloss"] <= ensemble["test_logloss"] + 1e-9,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    for key in ("ensemble < best single", "calibrate <= ensemble"):
        print(f"{key}: {sum(r[key] for r in rows)} of {len(rows)} seeds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        start = time.perf_counter()
        shared = load_profile(args.profile, args.overrides).at(work / "shared")
        run_stages(shared, SHARED)
        print(f"shared stages: {time.perf_counter() - start:.0f} s", flush=True)
        rows = []
        for seed in args.seeds:
            seeded = [f"{section}.seed={seed}" for section in ("head", "finetune", "pseudo")]
            cfg = load_profile(args.profile, [*args.overrides, *seeded]).at(work / f"seed{seed}")
            link_shared(shared, cfg)
            tick = time.perf_counter()
            rows.append(seed_row(seed, run_stages(cfg, PER_SEED)))
            print(f"seed {seed}: {time.perf_counter() - tick:.0f} s", flush=True)
        print(f"\nhidden-test log loss, profile {args.profile} {' '.join(args.overrides)}")
        print_table(rows)


if __name__ == "__main__":
    main()
