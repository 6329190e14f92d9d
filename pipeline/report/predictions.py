"""The out-of-fold predictions the report shows: the best ones present, aligned with their labels and
groups, and what is read off them (confusion, log loss per class and per group, the five views,
thumbnails of the images)."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

from pipeline.competition import TRAIN_INDEX, label_indices
from pipeline.config import MODELS, Config
from pipeline.metrics import OOF_FILE, normalise, prediction_classes, read_predictions, row_logloss

# The stages after the models, in DAG order: their out-of-fold rows are data/predictions/<stage>/oof.csv
# (the models' are data/predictions/oof/<model>/), their rows of reports/scores/ follow the models' (oof.json).
FINAL_STAGES = ("ensemble", "calibrate")
# Whose out-of-fold predictions the report shows: the latest stage that has them.
PREDICTION_SOURCES = (*reversed(FINAL_STAGES), *reversed(MODELS))
THUMB_SIZE = (128, 96)
N_RANDOM = 8
N_UNCERTAIN = 8


@dataclass
class OOFPredictions:
    source: str
    path: Path
    ids: np.ndarray
    probs: np.ndarray
    labels: np.ndarray
    classes: list[str]
    groups: np.ndarray | None = None  # split.csv's group of each row, where the competition has groups

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def prediction_files(cfg: Config) -> list[tuple[str, Path]]:
    """(source, out-of-fold file), best first: calibrate and ensemble under data/predictions/<stage>/,
    the models gathered by the oof stage under data/predictions/oof/<model>/."""
    return [(source, cfg.paths.path("predictions") / source / OOF_FILE if source in FINAL_STAGES
             else cfg.paths.oof_predictions(source) / OOF_FILE) for source in PREDICTION_SOURCES]


def find_oof_predictions(cfg: Config) -> OOFPredictions | str:
    """The best final out-of-fold predictions with their labels and groups (split.csv), or why there are none."""
    split_csv = cfg.paths.path("split_csv")
    for source, path in prediction_files(cfg):
        if not path.exists():
            continue
        if not split_csv.exists():
            return f"{path} exists but {split_csv} does not: labels unknown."
        ids, probs = read_predictions(path)  # skips the fold column
        classes = prediction_classes(path)
        split = pd.read_csv(split_csv, dtype=str, keep_default_na=False)
        # Checked in split.csv's own row order, so an unknown label is named at its row there.
        index_of = pd.Series(label_indices(split["label"].tolist(), classes, split_csv), index=split["id"])
        known = np.array([i in index_of.index for i in ids], dtype=bool)
        if not known.any():
            return f"{path}: none of its images is in {split_csv}."
        ids_arr = np.asarray(ids)[known]
        labels = index_of.loc[ids_arr].to_numpy(dtype=np.int64)
        probs = normalise(probs[known])
        groups = split.set_index("id").loc[ids_arr, "group"].to_numpy() if "group" in split.columns else None
        return OOFPredictions(source, path, ids_arr, probs, labels, classes, groups)
    looked = ", ".join(str(relative(cfg, path)) for _, path in prediction_files(cfg))
    return f"No out-of-fold predictions yet (looked for {looked})."


def relative(cfg: Config, path: Path) -> Path:
    try:
        return path.relative_to(cfg.paths.root)
    except ValueError:
        return path


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts: rows true class, columns predicted, every class present even when no row has it."""
    return sklearn_confusion_matrix(labels, predicted, labels=np.arange(n_classes)).astype(np.int64)


def mean_by(losses: np.ndarray, keys: np.ndarray) -> pd.DataFrame:
    """Mean log loss and image count per key, in first-seen key order."""
    frame = pd.DataFrame({"key": keys, "loss": losses})
    return frame.groupby("key", sort=False)["loss"].agg(["mean", "count"])


@dataclass(frozen=True)
class Breakdown:
    """Where the score is lost: the overall log loss, its mean per true class (class order) and per
    group (worst first; None without groups)."""

    overall: float
    per_class: pd.DataFrame
    per_group: pd.DataFrame | None


def breakdown(preds: OOFPredictions, has_groups: bool) -> Breakdown:
    losses = row_logloss(preds.probs, preds.labels)
    names = np.asarray(preds.classes, dtype=object)[preds.labels]
    per_class = mean_by(losses, names).reindex([c for c in preds.classes if c in set(names)])
    per_group = (mean_by(losses, preds.groups).sort_values("mean", ascending=False)
                 if has_groups and preds.groups is not None else None)
    return Breakdown(float(losses.mean()), per_class, per_group)


def five_views(preds: OOFPredictions, seed: int = 0) -> dict[str, list[int]]:
    """Row numbers for the five views of fast.ai's Practical Deep Learning for Coders, part 1 (2017),
    lesson 2: random correct, random incorrect, most correct per class, most incorrect per class, most
    uncertain. "Per class" is per predicted class, as in that lesson's notebook (most correct c: predicted
    c and right, highest p(c); most incorrect c: predicted c and wrong, highest p(c)). With ten classes
    "uncertain" is the smallest top-two margin."""
    rng = np.random.default_rng(seed)
    predicted, probs = preds.predicted, preds.probs
    correct = np.flatnonzero(predicted == preds.labels)
    wrong = np.flatnonzero(predicted != preds.labels)
    confidence = probs.max(axis=1)

    def most_confident(rows: np.ndarray) -> list[int]:
        return [int(rows[np.argmax(confidence[rows])])] if len(rows) else []

    views: dict[str, list[int]] = {
        "random correct": sorted(rng.choice(correct, min(N_RANDOM, len(correct)), replace=False).tolist()),
        "random incorrect": sorted(rng.choice(wrong, min(N_RANDOM, len(wrong)), replace=False).tolist()),
        "most correct per class": [],
        "most incorrect per class": [],
    }
    for c in range(len(preds.classes)):
        views["most correct per class"] += most_confident(correct[predicted[correct] == c])
        views["most incorrect per class"] += most_confident(wrong[predicted[wrong] == c])
    top2 = np.sort(probs, axis=1)[:, -2:]
    views["most uncertain"] = np.argsort(top2[:, 1] - top2[:, 0], kind="stable")[:N_UNCERTAIN].tolist()
    return views


def thumbnail_data_uri(path: Path) -> str | None:
    """A small base64 JPEG of the image (reduced-size decode), or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.draft("RGB", (THUMB_SIZE[0] * 2, THUMB_SIZE[1] * 2))
            image = image.convert("RGB")
            image.thumbnail(THUMB_SIZE)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=70)
    except (OSError, ValueError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_paths(cfg: Config) -> dict[str, Path]:
    """id -> file under data/raw, from ingest's train_index.csv (empty when absent)."""
    raw = cfg.paths.path("raw")
    index = raw / TRAIN_INDEX
    if not index.exists():
        return {}
    table = pd.read_csv(index, dtype=str, keep_default_na=False)
    return {image_id: raw / path for image_id, path in zip(table["id"], table["path"], strict=True)}
