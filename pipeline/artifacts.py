"""The user-facing artifacts (docs/design.md#the-artifact-contract): where each one is, for the CLI and flows."""

from __future__ import annotations

from pipeline.config import Config

# (attribute of PathsConfig, what it holds)
ARTIFACTS: list[tuple[str, str]] = [
    ("raw", "competition files as ingested + train_index/test_index (id,path,label,group), competition.json"),
    ("hidden", "hidden test labels (synthetic data only; never read by training)"),
    ("split_csv", "one row per labelled image: id, label, group, split, fold"),
    ("sample", "small train/valid sample mirror for fast iteration"),
    ("features", "cached conv features (fp16, checksummed chunks) incl. augmented copies"),
    ("models", "checkpoints per model and fold (<model>/fold<k>/)"),
    ("predictions", "per fold model folds/<model>/<k>/{oof,test}.csv; oof/<model>/, ensemble/, calibrate/: out-of-fold + test"),
    ("metrics", "every stage's figures, stage -> figures (read by the flows)"),
    ("scores", "DVC metrics: per model CV (and hidden-test) log loss and accuracy, one file each (`dvc metrics show`)"),
    ("plots", "DVC plots data: learning curves, confusion rows, calibration bins (`dvc plots show`)"),
    ("report_html", "the human report"),
    ("submission", "Kaggle submission, validated before any upload"),
]


def artifact_lines(cfg: Config) -> list[str]:
    """One line per artifact that exists: path and what it is."""
    lines = []
    for name, text in ARTIFACTS:
        path = cfg.paths.path(name)
        if path.exists():
            lines.append(f"  {str(path):<32} {text}")
    return lines
