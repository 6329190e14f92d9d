"""Can the validation number be trusted, and does the ensemble beat the best single model beyond one
lucky seed? For several seeds (split, head, finetune, pseudo and so member seeds; the data, pretrained
backbone and feature cache are shared), the chain from ``split`` to ``calibrate`` runs in ``cv`` mode
and in ``holdout`` mode, side by side. Per seed: each model's validation (CV) and hidden-test log
loss, the ensemble's and the calibrated submission's, how far the submission's estimate is from its
hidden-test log loss in each mode (calibrate's ``submission_logloss_estimate``, the method
``calibrate.estimate`` names; the OOF log loss alone beside it; ``benchmarks/submission_estimate.py``
compares every candidate on the runs this keeps with ``--workdir``), and the single model validation
would pick. Needs hidden labels, i.e. the synthetic data.

    python benchmarks/ensemble_seeds.py [--profile demo] [--seeds 0 1 2] [--modes cv holdout] [--set KEY=VALUE ...]
                                        [--workdir DIR] [--out results.json]

The demo takes about 4 minutes per seed in cv mode (3 folds) and 1.5 in holdout on 2 CPU cores, plus
about 2 minutes for the shared stages.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import Config, load_profile
from pipeline.registry import stage_module
from pipeline.training.classifier import MONITOR

SHARED = ("ingest", "split", "pretrain", "features")
PER_SEED = ("split", "head", "finetune", "pseudo", "member", "oof", "ensemble", "calibrate")
SHARED_PATHS = ("raw", "hidden", "features")
RELATIVE_ERROR_GOAL = 0.15
CALIBRATION_TOLERANCE = 0.001
# Finetune's first epoch (at first_epoch_lr, dropout and batchnorm in train mode) may cost this much
# validation log loss relative to the head it starts from: the new optimiser state settles (the
# continuity test in tests/test_finetune.py holds the same bound).
FIRST_EPOCH_TOLERANCE = 0.03


def run_stages(cfg: Config, names: tuple[str, ...]) -> dict[str, Any]:
    """Run the stages in order; their figures by stage (per-fold stages: by item)."""
    return {name: stage_module(name).run(cfg) for name in names}


def link_shared(shared: Config, cfg: Config) -> None:
    """``cfg``'s project reads the shared data, feature cache and pretrained backbone. The cv cache
    (every labelled image with its augmented copies) serves holdout runs too: a fold model looks its
    rows up by id."""
    pairs = [(shared.paths.path(p), cfg.paths.path(p)) for p in SHARED_PATHS]
    pairs.append((shared.paths.path("models") / "pretrain", cfg.paths.path("models") / "pretrain"))
    for source, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():  # a rerun in the same --workdir (its finished training runs are reused)
            target.unlink()
        target.symlink_to(source.resolve())


def first_epoch_drift(cfg: Config) -> float | None:
    """Holdout mode: finetune's validation log loss after its first (low learning rate) epoch relative to
    the head's it starts from (+0.01 = 1% worse). cv fold models have no validation loop: None."""
    log = cfg.paths.fold_models("finetune", 0) / "logs" / "metrics.csv"
    if cfg.split.validation != "holdout" or not log.exists():
        return None
    epochs = pd.read_csv(log).dropna(subset=[MONITOR]).sort_values("epoch")
    head = json.loads(cfg.paths.stage_metrics_file("head@0").read_text())["valid_logloss"]
    return float(epochs[MONITOR].iloc[0]) / head - 1


def mode_row(figures: dict[str, Any], drift: float | None = None) -> dict[str, Any]:
    """One mode's figures for one seed: per model (validation, test), then ensemble and submission."""
    models = figures["oof"]["models"]
    ensemble, calibrate = figures["ensemble"], figures["calibrate"]
    picked = min(models, key=lambda m: models[m]["valid_logloss"])
    best_test = min(m["test_logloss"] for m in models.values())
    # the submission's estimate (calibrate.estimate's method)
    estimate = calibrate["submission_logloss_estimate"]
    hidden = calibrate["test_logloss"]
    return {
        "models": {m: [f["valid_logloss"], f["test_logloss"]] for m, f in models.items()},
        "ensemble": [ensemble["valid_logloss"], ensemble["test_logloss"]],
        "submission": [estimate, hidden],
        "relative_error": abs(estimate - hidden) / hidden,
        "submission_oof": calibrate["valid_logloss"],
        "relative_error_oof": abs(calibrate["valid_logloss"] - hidden) / hidden,
        "fold_averaging_gain": calibrate.get("fold_averaging_gain"),
        "best_single_test": best_test,
        "picked_single": picked,
        "picked_single_test": models[picked]["test_logloss"],
        "ensemble_beats_best_single": ensemble["test_logloss"] < best_test,
        "ensemble_beats_picked_single": ensemble["test_logloss"] < models[picked]["test_logloss"],
        "calibration_ok": calibrate["test_logloss"] <= ensemble["test_logloss"] + CALIBRATION_TOLERANCE,
        "weights": ensemble["weights"],
        "smoothing_k": ensemble["smoothing_k"],
        "calibration_applied": calibrate["applied"],
        "first_epoch_drift": drift,
    }


def print_tables(results: dict[int, dict[str, dict[str, Any]]], modes: list[str]) -> None:
    print("| seed | mode | " + " | ".join(f"{m} (val / test)" for m in next(iter(results.values()))[modes[0]]["models"])
          + " | ensemble (val / test) | submission estimate / hidden test | error | OOF alone (error) |\n|"
          + " --- |" * (len(next(iter(results.values()))[modes[0]]["models"]) + 6))
    for seed, by_mode in results.items():
        for mode in modes:
            row = by_mode[mode]
            pairs = [*row["models"].values(), row["ensemble"], row["submission"]]
            cells = [f"{v:.4f} / {t:.4f}" for v, t in pairs]
            print(f"| {seed} | {mode} | " + " | ".join(cells) + f" | {row['relative_error']:.1%} | "
                  f"{row['submission_oof']:.4f} ({row['relative_error_oof']:.1%}) |")
    n = len(results)
    print()
    for mode in modes:
        rows = [r[mode] for r in results.values()]
        print(f"{mode}: estimate within {RELATIVE_ERROR_GOAL:.0%} of hidden test on "
              f"{sum(r['relative_error'] <= RELATIVE_ERROR_GOAL for r in rows)} of {n} seeds; ensemble beats the best "
              f"single model on hidden test on {sum(r['ensemble_beats_best_single'] for r in rows)} of {n}, the single "
              f"model validation picks on {sum(r['ensemble_beats_picked_single'] for r in rows)} of {n}; calibration "
              f"no worse than the ensemble (+{CALIBRATION_TOLERANCE}) on {sum(r['calibration_ok'] for r in rows)} of {n}")
    if {"cv", "holdout"} <= set(modes):
        closer = sum(r["cv"]["relative_error"] < r["holdout"]["relative_error"] for r in results.values())
        print(f"cv estimate closer to hidden test than holdout's on {closer} of {n} seeds")
        closer_oof = sum(r["cv"]["relative_error_oof"] < r["holdout"]["relative_error"] for r in results.values())
        print(f"(the OOF log loss alone: closer on {closer_oof} of {n})")
    print_stage_means(results, modes)
    drifts = [r["holdout"]["first_epoch_drift"] for r in results.values() if "holdout" in r]
    if drifts := [d for d in drifts if d is not None]:
        print(f"finetune's first epoch vs the head (holdout validation): {' '.join(f'{d:+.1%}' for d in drifts)}; "
              f"within +{FIRST_EPOCH_TOLERANCE:.0%} on {sum(d <= FIRST_EPOCH_TOLERANCE for d in drifts)} of {len(drifts)}")


def print_stage_means(results: dict[int, dict[str, dict[str, Any]]], modes: list[str]) -> None:
    """Per stage, the mean over seeds of validation and hidden-test log loss: does each stage keep or
    improve on its predecessor on average?"""
    for mode in modes:
        rows = [{**r[mode]["models"], "ensemble": r[mode]["ensemble"], "submission": r[mode]["submission"]}
                for r in results.values()]
        means = {name: [sum(row[name][i] for row in rows) / len(rows) for i in (0, 1)] for name in rows[0]}
        print(f"{mode}, mean over {len(rows)} seeds (val / test): "
              + ", ".join(f"{name} {v:.4f} / {t:.4f}" for name, (v, t) in means.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=["cv", "holdout"], choices=["cv", "holdout"])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write every figure as JSON here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        start = time.perf_counter()
        shared = load_profile(args.profile, [*args.overrides, "split.validation=cv"]).at(work / "shared")
        run_stages(shared, SHARED)
        print(f"shared stages: {time.perf_counter() - start:.0f} s", flush=True)
        results: dict[int, dict[str, dict[str, Any]]] = {}
        for seed in args.seeds:
            results[seed] = {}
            for mode in args.modes:
                seeded = [f"{section}.seed={seed}" for section in ("split", "head", "finetune", "pseudo")]
                cfg = load_profile(args.profile, [*args.overrides, *seeded, f"split.validation={mode}"]).at(work / f"{mode}{seed}")
                link_shared(shared, cfg)
                tick = time.perf_counter()
                results[seed][mode] = mode_row(run_stages(cfg, PER_SEED), first_epoch_drift(cfg))
                row = results[seed][mode]
                print(f"seed {seed} {mode}: {time.perf_counter() - tick:.0f} s; submission estimate "
                      f"{row['submission'][0]:.4f}, hidden test {row['submission'][1]:.4f}", flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
        print(f"\nvalidation / hidden-test log loss, profile {args.profile} {' '.join(args.overrides)}")
        print_tables(results, args.modes)


if __name__ == "__main__":
    main()
