"""The stage chain, in DAG order. One name everywhere: module ``pipeline.stages.<name>``, DVC stage
``<name>``, Prefect task ``<name>``. Add a stage here, in dvc.yaml and as a module; the flow and
the CLI pick it up from this list."""

from __future__ import annotations

import importlib
from types import ModuleType

# Stages trained once per fold (DVC foreach over split.fold_ids; member: a matrix with ensemble.members).
PER_FOLD = ("head", "finetune", "pseudo", "member")

# name -> one-line description (shown by `python -m pipeline --help`)
STAGES: dict[str, str] = {
    "ingest": "verify and copy the competition files into data/raw (synthetic, dir, zip or kaggle)",
    "split": "group-aware, class-stratified K folds (cv) or one held-out validation set (holdout)",
    "sample": "a small train/valid sample drawn from the split, drivers kept apart",
    "pretrain": "stand-in for ImageNet weights on CPU: narrow VGG trained on a separate synthetic domain",
    "features": "frozen conv base over valid, test and train x N augmented copies, fp16 chunks",
    "head": "per fold: dense batchnorm + dropout head trained on the cached features",
    "finetune": "per fold: Lightning fine-tuning of the batchnorm VGG, starting from the fold's head",
    "pseudo": "per fold: retraining with a fixed pseudo-labelled fraction of every batch",
    "member": "per (member, fold): extra fine-tuned CNNs (or heads) with their own seed",
    "oof": "gather each model's out-of-fold predictions; CV log loss per model and per fold",
    "ensemble": "hill-climbing ensemble on out-of-fold predictions, nested estimate, neighbour smoothing",
    "calibrate": "temperature scaling and clipping fitted on out-of-fold rows, nested estimate",
    "submit": "validated submissions/submission.csv; Kaggle upload or dry run",
    "report": "collect every stage's figures into reports/metrics.json and reports/report.html",
}
POSITION = {name: i for i, name in enumerate(STAGES)}


def model_rank(name: str) -> tuple[int, int, str]:
    """Sort key of model names, and of the final stages listed beside them: in the DAG order of the
    stage that makes each (pretrain, head, finetune, pseudo, member<m> by m, ensemble, calibrate),
    then any other name."""
    number = name.removeprefix("member")
    if name.startswith("member") and number.isdigit():
        return (POSITION["member"], int(number), name)
    return (POSITION.get(name, len(STAGES)), 0, name)


def stage_module(name: str) -> ModuleType:
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(f"pipeline.stages.{name}")
