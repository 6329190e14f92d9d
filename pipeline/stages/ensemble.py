"""``ensemble`` stage: combine the members' predictions, with test-time augmentation and test-neighbour
smoothing, into ``data/predictions/ensemble/{valid,test}.csv``.

1. **Members.** Each ``member@<m>`` stage's predictions: a fine-tuned member's
   (``data/predictions/member/<m>``, TTA already decided by the member stage), or a head member's,
   predicted here from the cached conv features by ``models/member/<m>/head.pt``. The predictions of
   the stages in ``ensemble.include`` (head, finetune, pseudo) join as they are, when they exist.
2. **TTA** (head members). A member head also predicts ``ensemble.tta`` augmented copies of every
   valid and test image (the features stage's augmentation, never a flip), and the passes are
   averaged; a member keeps TTA only when it lowers that member's validation log loss. Augmented
   valid/test features come from the cache when it holds them, else they are computed here with the
   same conv base.
3. **Mean.** Arithmetic or geometric (``exp(sum w log p)``, renormalised), equal weights or weights on
   the simplex fitted on validation log loss (``ensemble.fit_weights``; equal weights and every
   single member are candidates too, so the fitted ensemble is never worse on validation than the
   best member). Fitting on the validation it is scored on is optimistic, so
   ``valid_logloss_crossfit`` reports weights fitted on some validation drivers and scored on the
   others, for fitted and for equal weights alike: the evidence for choosing ``fit_weights``.
4. **Test-neighbour smoothing** (``pipeline.neighbours``): each prediction averaged with its k
   nearest neighbours (cosine, cached features), k chosen among 1, 2, 3, 5, 10 ... up to
   ``ensemble.neighbours`` by validation log loss, smoothing among the validation images; applied to
   test only when it lowers validation log loss (``smoothing_applied``, ``smoothing_k``);
   before/after figures for valid (and hidden test) either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from pipeline.config import Config, item_stage
from pipeline.errors import BadInputError, StageError
from pipeline.featurecache import FeatureSplit, embed_batches, load_meta, load_split, resolve_device
from pipeline.folds import group_folds
from pipeline.metrics import (
    KAGGLE_EPS,
    accuracy,
    evaluate,
    kaggle_logloss,
    keep_tta_if_better,
    prediction_classes,
    read_hidden_labels,
    read_predictions,
    write_predictions,
    write_stage_metrics,
)
from pipeline.neighbours import nearest_neighbours, neighbour_smoothing, smooth_with_neighbours
from pipeline.recipes import HEAD_FILE, load_head
from pipeline.tables import read_image_tables
from pipeline.training import predict_features as predict_probs

Mean = Literal["arithmetic", "geometric"]


def member_stage(member: int) -> str:
    return item_stage("member", member)


@dataclass
class Member:
    """One member's predictions, rows aligned with the ensemble's valid and test image order."""

    name: str
    valid: np.ndarray
    test: np.ndarray
    figures: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- combining


def normalise(probs: np.ndarray) -> np.ndarray:
    return probs / probs.sum(axis=-1, keepdims=True)


def combine(member_probs: np.ndarray, weights: np.ndarray, mean: Mean = "arithmetic") -> np.ndarray:
    """Weighted mean of ``(members, n, classes)`` probabilities, rows renormalised."""
    member_probs = np.asarray(member_probs, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    if mean == "geometric":
        # A log-linear pool: one member's confident "no" vetoes a class; floored at Kaggle's epsilon.
        logp = np.log(np.clip(normalise(member_probs), KAGGLE_EPS, 1.0))
        logits = np.tensordot(weights, logp, axes=1)
        return normalise(np.exp(logits - logits.max(axis=1, keepdims=True)))
    return normalise(np.tensordot(weights, normalise(member_probs), axes=1))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def fit_weights(member_probs: np.ndarray, labels: np.ndarray, mean: Mean = "arithmetic") -> np.ndarray:
    """Simplex weights minimising log loss of ``combine``: a softmax-parametrised search from equal
    weights, then the best of it, equal weights and each single member (so never worse than those)."""
    n_members = len(member_probs)
    equal = np.full(n_members, 1.0 / n_members)
    if n_members == 1:
        return equal

    def loss(weights: np.ndarray) -> float:
        return kaggle_logloss(combine(member_probs, weights, mean), labels)

    fitted = softmax(minimize(lambda z: loss(softmax(z)), np.zeros(n_members), method="L-BFGS-B").x)
    candidates = [fitted, equal, *np.eye(n_members)]
    return min(candidates, key=loss)


def ensemble_weights(member_probs: np.ndarray, labels: np.ndarray, mean: Mean, fit: bool) -> np.ndarray:
    return fit_weights(member_probs, labels, mean) if fit else np.full(len(member_probs), 1.0 / len(member_probs))


def cross_fitted(member_probs: np.ndarray, labels: np.ndarray, groups: np.ndarray, mean: Mean, fit: bool,
                 n_folds: int) -> np.ndarray | None:
    """Every validation row combined with weights fitted on the other drivers' rows."""
    folds = group_folds(np.asarray(groups), n_folds)
    if folds is None:
        return None
    out = np.empty(member_probs.shape[1:], dtype=np.float64)
    for fold in np.unique(folds):
        held = folds == fold
        weights = ensemble_weights(member_probs[:, ~held], labels[~held], mean, fit)
        out[held] = combine(member_probs[:, held], weights, mean)
    return out


# ---------------------------------------------------------------------------- smoothing


def candidate_ks(max_k: int) -> list[int]:
    """Neighbour counts tried on validation: 1, 2, 3, 5, 10, 20, 50 up to ``max_k``, and ``max_k``."""
    return sorted({k for k in (1, 2, 3, 5, 10, 20, 50) if k < max_k} | ({max_k} if max_k > 0 else set()))


def smoothing_decision(valid: np.ndarray, labels: np.ndarray, valid_features: np.ndarray,
                       max_k: int) -> tuple[int, np.ndarray, dict[int, float]]:
    """(k, smoothed valid, valid log loss by k): the neighbour count that lowers validation log loss
    most, smoothing among the validation images; k = 0 (off) when none lowers it.

    k is chosen, not fixed, because the right k is about the number of frames a driver has per class
    (real data: ~80, the 1st place used 10; the demo: ~10): past it, neighbours are other classes."""
    ks = candidate_ks(max_k)
    if not ks:
        return 0, valid, {}
    neighbours = nearest_neighbours(valid_features, ks[-1])  # nearest first: the k nearest are [:, :k]
    smoothed = {k: smooth_with_neighbours(valid, neighbours[:, :k]) for k in ks}
    by_k = {k: kaggle_logloss(probs, labels) for k, probs in smoothed.items()}
    k = min(by_k, key=by_k.get)
    if by_k[k] >= kaggle_logloss(valid, labels):
        return 0, valid, by_k
    return k, smoothed[k], by_k


def smoothing_figures(labels: np.ndarray, before: np.ndarray, after: np.ndarray, test_labels: np.ndarray | None,
                      test_before: np.ndarray, test_after: np.ndarray) -> dict[str, float]:
    """Log loss and accuracy before/after smoothing, valid and (where labels exist) hidden test."""
    out: dict[str, float] = {}
    pairs = [("valid", labels, before, after)]
    if test_labels is not None:
        pairs.append(("test", test_labels, test_before, test_after))
    for split, y, b, a in pairs:
        out[f"smoothing_{split}_logloss_before"] = kaggle_logloss(b, y)
        out[f"smoothing_{split}_logloss_after"] = kaggle_logloss(a, y)
        out[f"smoothing_{split}_acc_before"] = accuracy(b, y)
        out[f"smoothing_{split}_acc_after"] = accuracy(a, y)
    return out


# ---------------------------------------------------------------------------- TTA features


def cached_augmented(split: FeatureSplit, imgs: np.ndarray, passes: int) -> list[np.ndarray] | None:
    """Copies 1..passes of ``imgs`` from the cache, or None when the cache holds too few copies."""
    if split.copies <= passes:
        return None
    table = split.index.pivot(index="id", columns="copy", values="row")
    return [split.features[table.loc[imgs, k].to_numpy()] for k in range(1, passes + 1)]


def computed_augmented(cfg: Config, image_paths: dict[str, list[str]], passes: int,
                       reference: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Copies 1..passes of each split's images (augmented like the features stage's train copies, seed
    ``(features.seed, copy, file name)``) through the features stage's conv base. ``reference`` holds
    each split's cached plain features, checked against a recomputation so a cache made by another
    model is refused rather than mixed in."""
    from torch.utils.data import DataLoader

    from pipeline.data import ImageRowsDataset, build_augmentation, seed_worker
    from pipeline.models import create_backbone, create_conv_base, input_hw, resolve_preprocessing

    device = resolve_device(cfg.features.device)
    backbone = create_backbone(cfg.model)
    data_cfg = resolve_preprocessing(backbone, cfg.model)
    conv_base = create_conv_base(backbone, data_cfg, cfg.features.grid).to(device)
    augmentation = build_augmentation(cfg.augment)

    def embed(paths: list[str], copies: list[int]) -> np.ndarray:
        dataset = ImageRowsDataset(paths, input_hw(data_cfg), copies=copies, augmentation=augmentation, seed=cfg.features.seed)
        loader = DataLoader(dataset, batch_size=cfg.features.batch_size, shuffle=False, num_workers=cfg.features.num_workers,
                            worker_init_fn=seed_worker, pin_memory=device.type == "cuda")
        return np.concatenate(list(embed_batches(conv_base, loader, device)))

    out: dict[str, list[np.ndarray]] = {}
    for name, paths in image_paths.items():
        check_same_model(embed(paths[:4], [0] * min(4, len(paths))), reference[name][:4], name)
        n = len(paths)
        flat = embed(paths * passes, [k for k in range(1, passes + 1) for _ in range(n)])
        out[name] = [flat[i * n:(i + 1) * n] for i in range(passes)]
    return out


def check_same_model(recomputed: np.ndarray, cached: np.ndarray, split: str) -> None:
    """Refuse when the conv base no longer reproduces the cache (fp16 rounding and GPU autocast
    differ by far less than 2% of the feature scale)."""
    a, b = recomputed.astype(np.float64), cached.astype(np.float64)
    if a.shape != b.shape:
        raise StageError(f"cached {split} features have shape {b.shape[1:]}, the current model gives {a.shape[1:]}: "
                         "rerun the features stage")
    scale = max(float(np.abs(b).max(initial=0.0)), 1e-6)
    if a.size and float(np.abs(a - b).max()) > 0.02 * scale:
        raise StageError(f"cached {split} features differ from the current model's: rerun the features stage")


def augmented_features(cfg: Config, splits: dict[str, FeatureSplit], imgs: dict[str, np.ndarray],
                       plain: dict[str, np.ndarray], passes: int) -> dict[str, list[np.ndarray]]:
    """``passes`` augmented feature arrays per split (valid, test), aligned with ``imgs``."""
    if passes == 0:
        return {name: [] for name in splits}
    cached = {name: cached_augmented(split, imgs[name], passes) for name, split in splits.items()}
    missing = [name for name, feats in cached.items() if feats is None]
    if missing:
        tables = read_image_tables(cfg)
        paths = {name: tables[name].set_index("id").loc[imgs[name], "path"].tolist() for name in missing}
        cached.update(computed_augmented(cfg, paths, passes, {name: plain[name] for name in missing}))
    return cached


# ---------------------------------------------------------------------------- members


def tta_probs(head: Any, plain: np.ndarray, augmented: list[np.ndarray]) -> np.ndarray:
    """The head's probabilities averaged over the plain pass and each augmented pass."""
    return np.mean([predict_probs(head, feats) for feats in [plain, *augmented]], axis=0)


def head_member(cfg: Config, member: int, plain: dict[str, np.ndarray], augmented: dict[str, list[np.ndarray]],
                labels: np.ndarray) -> Member:
    """A ``member@<m>`` head's predictions, with TTA when it lowers this member's validation loss."""
    path = cfg.paths.member_models(member) / HEAD_FILE
    if not path.exists():
        raise StageError(f"{path} not found: run the {member_stage(member)} stage first")
    head, _meta = load_head(path)
    valid, test, figures = keep_tta_if_better(
        labels, predict_probs(head, plain["valid"]), predict_probs(head, plain["test"]),
        (lambda: tta_probs(head, plain["valid"], augmented["valid"])) if augmented["valid"] else None,
        lambda: tta_probs(head, plain["test"], augmented["test"]))
    return Member(member_stage(member), valid, test, figures)


def aligned_predictions(path: Path, imgs: np.ndarray, classes: list[str]) -> np.ndarray | None:
    """Rows of a predictions file in ``imgs`` order; None when it lacks any of them."""
    if prediction_classes(path) != list(classes):
        raise BadInputError(path, f"class columns must be {','.join(classes)} (the competition's), "
                                  f"got {','.join(prediction_classes(path))}", row=1)
    got_imgs, probs = read_predictions(path)
    frame = pd.DataFrame(probs, index=got_imgs)
    if frame.index.duplicated().any():
        raise BadInputError(path, "duplicate id rows")
    if not pd.Index(imgs).isin(frame.index).all():
        return None
    return frame.loc[imgs].to_numpy(dtype=np.float64)


def predictions_member(name: str, folder: Path, valid_imgs: np.ndarray, test_imgs: np.ndarray,
                       classes: list[str]) -> Member | None:
    """The predictions in ``folder`` as a member, when both files exist and cover every image."""
    if not ((folder / "valid.csv").exists() and (folder / "test.csv").exists()):
        return None
    valid = aligned_predictions(folder / "valid.csv", valid_imgs, classes)
    test = aligned_predictions(folder / "test.csv", test_imgs, classes)
    if valid is None or test is None:
        return None
    return Member(name, normalise(valid), normalise(test))


def stage_member(cfg: Config, stage: str, valid_imgs: np.ndarray, test_imgs: np.ndarray,
                 classes: list[str]) -> Member | None:
    """Another stage's predictions (``ensemble.include``), when they exist."""
    return predictions_member(stage, cfg.paths.path("predictions") / stage, valid_imgs, test_imgs, classes)


def finetuned_member(cfg: Config, member: int, imgs: dict[str, np.ndarray], classes: list[str]) -> Member:
    """A fine-tuned ``member@<m>``'s predictions, as its stage wrote them (TTA decided there)."""
    folder = cfg.paths.member_predictions(member)
    found = predictions_member(member_stage(member), folder, imgs["valid"], imgs["test"], classes)
    if found is None:
        raise StageError(f"{folder}/valid.csv and test.csv with every valid and test image not found: "
                         f"run the {member_stage(member)} stage first")
    return found


# ---------------------------------------------------------------------------- stage


def valid_groups(split_csv: Path, ids: np.ndarray) -> np.ndarray:
    """Group of each validation image (for the cross-fitted estimate; the image itself without groups)."""
    if not split_csv.exists():
        raise StageError(f"{split_csv} not found: run the split stage first")
    split = pd.read_csv(split_csv, dtype={"id": str, "group": str}, keep_default_na=False).set_index("id")
    return split.loc[ids, "group"].to_numpy()


def crossfit_logloss(probs: np.ndarray | None, labels: np.ndarray) -> float | None:
    return None if probs is None else kaggle_logloss(probs, labels)


def rounded(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return round(float(value), 6)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def run(cfg: Config) -> dict[str, Any]:
    start = time.perf_counter()
    opts = cfg.ensemble
    features_dir = cfg.paths.path("features")
    splits = {name: load_split(features_dir, name) for name in ("valid", "test")}
    rows = {name: split.rows_of_copy(0) for name, split in splits.items()}
    imgs = {name: split.index["id"].to_numpy()[rows[name]] for name, split in splits.items()}
    plain = {name: split.features[rows[name]] for name, split in splits.items()}
    classes = load_meta(features_dir)["classes"]
    labels = splits["valid"].labels(classes)[rows["valid"]]
    hidden = read_hidden_labels(cfg.paths.path("hidden"), classes)
    test_labels = np.array([hidden[i] for i in imgs["test"]]) if hidden is not None else None

    if opts.member_model == "head":
        augmented = augmented_features(cfg, splits, imgs, plain, opts.tta if opts.members else 0)
        members = [head_member(cfg, m, plain, augmented, labels) for m in opts.members]
    else:
        members = [finetuned_member(cfg, m, imgs, classes) for m in opts.members]
    members += [m for m in (stage_member(cfg, s, imgs["valid"], imgs["test"], classes) for s in opts.include)
                if m is not None]
    if not members:
        raise StageError(f"no ensemble members: ensemble.members is empty and none of {opts.include} has predictions")
    for member in members:
        member.figures.update(evaluate(member.valid, labels, list(imgs["test"]), member.test, hidden))

    stacked_valid = np.stack([m.valid for m in members])
    weights = ensemble_weights(stacked_valid, labels, opts.mean, opts.fit_weights)
    valid = combine(stacked_valid, weights, opts.mean)
    test = combine(np.stack([m.test for m in members]), weights, opts.mean)
    groups = valid_groups(cfg.paths.path("split_csv"), imgs["valid"])
    crossfit = {fit: cross_fitted(stacked_valid, labels, groups, opts.mean, fit, opts.cross_fit_folds) for fit in (True, False)}

    k, valid_smoothed, valid_by_k = smoothing_decision(valid, labels, plain["valid"], opts.neighbours)
    shown_k = k or min(valid_by_k, key=valid_by_k.get, default=0)  # figures for the best k even when off
    smoothing: dict[str, Any] = {}
    if shown_k:
        test_smoothed = neighbour_smoothing(test, plain["test"], shown_k)
        shown_valid = valid_smoothed if k else neighbour_smoothing(valid, plain["valid"], shown_k)
        smoothing = {**smoothing_figures(labels, valid, shown_valid, test_labels, test, test_smoothed),
                     "smoothing_valid_logloss_by_k": [[k_, v] for k_, v in valid_by_k.items()]}
        if k:
            valid, test = valid_smoothed, test_smoothed

    out = cfg.paths.path("predictions") / "ensemble"
    write_predictions(out / "valid.csv", imgs["valid"], valid, classes)
    write_predictions(out / "test.csv", imgs["test"], test, classes)

    best = min(members, key=lambda m: m.figures["valid_logloss"])
    figures: dict[str, Any] = {
        **evaluate(valid, labels, list(imgs["test"]), test, hidden),
        # the chosen weighting's, then both: fitted weights earn their keep only where they beat equal ones
        "valid_logloss_crossfit": crossfit_logloss(crossfit[opts.fit_weights], labels),
        "valid_logloss_crossfit_fitted": crossfit_logloss(crossfit[True], labels),
        "valid_logloss_crossfit_equal": crossfit_logloss(crossfit[False], labels),
        "fit_weights": opts.fit_weights,
        "member_model": opts.member_model,
        "mean": opts.mean,
        "weights": {m.name: float(w) for m, w in zip(members, weights, strict=True)},
        "n_members": len(members),
        "best_member": best.name,
        "best_member_valid_logloss": best.figures["valid_logloss"],
        "tta_passes": opts.tta,
        "neighbours": opts.neighbours,
        "smoothing_k": shown_k,
        "smoothing_applied": bool(k),
        **smoothing,
        "members": {m.name: m.figures for m in members},
        "seconds": time.perf_counter() - start,
    }
    figures = rounded(figures)
    write_stage_metrics(cfg.paths.stage_metrics_file("ensemble"), figures)
    return figures
