"""Does the CPU profile learn real images, and does it beat a classic baseline? Real handwritten digits
(scikit-learn's 1,797 8x8 scans, the only real images a package ships here) rendered into State
Farm's exact Kaggle layout, with "writers" as groups (test writers never seen in training, as test
drivers), then the whole chain (``cpu`` profile by default, ``ingest.source: dir``) against two classic
baselines on the same split: HOG features + logistic regression and raw pixels + logistic
regression. Hidden-test log loss and accuracy side by side, per seed.

    python benchmarks/real_images.py [--profile cpu] [--seeds 0 1 2] [--set KEY=VALUE ...] [--workdir DIR] [--out results.json]

Rendering: each scan upscaled to 64x64, on a 96x96 canvas; every writer has its own ink colour,
stroke weight (a max filter), background tone, offset and slant, and every image its own jitter and
JPEG noise: the group structure (near-duplicate style within a writer) the split must respect.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from pipeline.config import load_profile
from pipeline.metrics import accuracy, kaggle_logloss, read_predictions
from pipeline.registry import stage_module

CLASSES = [f"c{k}" for k in range(10)]
SIZE = 96
STAGES = ("ingest", "split", "pretrain", "features", "head", "finetune", "pseudo", "member", "oof", "ensemble",
          "calibrate")


# ---------------------------------------------------------------------------- the dataset


def render(scan: np.ndarray, style: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """One 8x8 scan (0..16) as a 96x96 RGB photo-like image in the writer's style."""
    ink = Image.fromarray((scan / 16 * 255).astype(np.uint8)).resize((64, 64), Image.BILINEAR)
    ink = ink.rotate(style["slant"] + rng.normal(0, 4), resample=Image.BILINEAR)
    if style["weight"] > 1:
        ink = ink.filter(ImageFilter.MaxFilter(style["weight"]))
    canvas = Image.new("RGB", (SIZE, SIZE), style["background"])
    colour = Image.new("RGB", (64, 64), style["ink"])
    dx, dy = (np.clip(np.array(style["offset"]) + rng.integers(-4, 5, 2), 0, SIZE - 64)).tolist()
    canvas.paste(colour, (dx, dy), ink)
    noisy = np.asarray(canvas, dtype=np.float32) + rng.normal(0, 6, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def writer_style(rng: np.random.Generator) -> dict[str, Any]:
    return {"ink": tuple(rng.integers(0, 120, 3).tolist()), "background": tuple(rng.integers(150, 256, 3).tolist()),
            "weight": int(rng.choice([1, 3, 5])), "slant": float(rng.normal(0, 10)),
            "offset": rng.integers(8, SIZE - 72, 2).tolist()}


def write_competition(root: Path, seed: int, n_writers: int = 30, n_test_writers: int = 8) -> pd.DataFrame:
    """State Farm's layout under ``root``; returns every image with its class, writer and split."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    writers = rng.integers(0, n_writers, len(digits.images))  # each scan drawn by one writer
    test_writers = set(rng.choice(n_writers, n_test_writers, replace=False).tolist())
    styles = [writer_style(rng) for _ in range(n_writers)]
    rows = []
    for i, (scan, label, writer) in enumerate(zip(digits.images, digits.target, writers, strict=True)):
        split = "test" if writer in test_writers else "train"
        name = f"img_{i}.jpg"
        rel = f"imgs/test/{name}" if split == "test" else f"imgs/train/c{label}/{name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        render(scan, styles[writer], rng).save(root / rel, quality=int(rng.integers(70, 95)))
        rows.append({"img": name, "classname": f"c{label}", "subject": f"w{writer:03d}", "split": split, "path": rel})
    table = pd.DataFrame(rows)
    train = table[table["split"] == "train"]
    train[["subject", "classname", "img"]].to_csv(root / "driver_imgs_list.csv", index=False)
    test = table[table["split"] == "test"]
    pd.DataFrame({"img": test["img"], **{c: 0.1 for c in CLASSES}}).to_csv(root / "sample_submission.csv", index=False)
    return table


# ---------------------------------------------------------------------------- baselines


def hog(image: np.ndarray, cell: int = 12, bins: int = 9) -> np.ndarray:
    """Histograms of oriented gradients (Dalal & Triggs 2005) on the grey image: unsigned orientations,
    magnitude-weighted, per cell, each 2x2 block of cells L2-normalised."""
    grey = image.astype(np.float32).mean(axis=2)
    gy, gx = np.gradient(grey)
    magnitude, angle = np.hypot(gx, gy), np.rad2deg(np.arctan2(gy, gx)) % 180
    n = grey.shape[0] // cell
    which = np.minimum((angle / (180 / bins)).astype(int), bins - 1)
    cells = np.zeros((n, n, bins), dtype=np.float32)
    for i in range(n):
        for j in range(n):
            sl = np.s_[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell]
            cells[i, j] = np.bincount(which[sl].ravel(), magnitude[sl].ravel(), minlength=bins)
    blocks = [cells[i:i + 2, j:j + 2].ravel() for i in range(n - 1) for j in range(n - 1)]
    return np.concatenate([b / np.sqrt((b ** 2).sum() + 1e-6) for b in blocks])


def baseline(table: pd.DataFrame, root: Path, featurise) -> np.ndarray:
    """Test probabilities of a logistic regression on ``featurise(image)`` of the train images."""
    images = {row.img: np.asarray(Image.open(root / row.path).convert("RGB")) for row in table.itertuples()}
    train, test = table[table["split"] == "train"], table[table["split"] == "test"]
    scaler = StandardScaler().fit(np.stack([featurise(images[i]) for i in train["img"]]))
    model = LogisticRegression(max_iter=2000, C=0.1).fit(
        scaler.transform(np.stack([featurise(images[i]) for i in train["img"]])), train["classname"].map(CLASSES.index))
    return model.predict_proba(scaler.transform(np.stack([featurise(images[i]) for i in test["img"]])))


def pixels(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).convert("L").resize((24, 24)), dtype=np.float32).ravel()


# ---------------------------------------------------------------------------- the pipeline


def pipeline_probs(root: Path, work: Path, profile: str, overrides: list[str],
                   test_ids: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    cfg = load_profile(profile, [*overrides, "ingest.source=dir", f"ingest.path={root}"]).at(work)
    figures = {}
    for name in STAGES:
        figures[name] = stage_module(name).run(cfg)
    ids, probs = read_predictions(cfg.paths.path("predictions") / "calibrate" / "test.csv")
    position = {image_id: i for i, image_id in enumerate(ids)}
    return probs[[position[i] for i in test_ids]], figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu", help="the CPU profile for a real competition (or demo)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        for seed in args.seeds:
            root = work / f"digits{seed}"
            table = write_competition(root, seed)
            test = table[table["split"] == "test"]
            labels = test["classname"].map(CLASSES.index).to_numpy()
            row: dict[str, Any] = {"seed": seed, "n_train": int((table["split"] == "train").sum()), "n_test": len(test)}
            for name, featurise in (("hog_logreg", hog), ("pixels_logreg", pixels)):
                probs = baseline(table, root, featurise)
                row[name] = [kaggle_logloss(probs, labels), accuracy(probs, labels)]
            start = time.perf_counter()
            probs, figures = pipeline_probs(root, work / f"run{seed}", args.profile, [*args.overrides, f"seed={seed}"], test["img"].tolist())
            row["pipeline"] = [kaggle_logloss(probs, labels), accuracy(probs, labels)]
            row["pipeline_cv_logloss"] = figures["calibrate"]["valid_logloss"]
            row["pipeline_seconds"] = round(time.perf_counter() - start, 1)
            row["models_cv"] = {m: f["valid_logloss"] for m, f in figures["oof"]["models"].items()}
            results.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    print("\n| seed | pipeline (CV estimate) | pipeline test | HOG + logistic regression | pixels + logistic regression | pipeline s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['seed']} | {r['pipeline_cv_logloss']:.3f} | {r['pipeline'][0]:.3f} ({r['pipeline'][1]:.0%}) | "
              f"{r['hog_logreg'][0]:.3f} ({r['hog_logreg'][1]:.0%}) | {r['pixels_logreg'][0]:.3f} ({r['pixels_logreg'][1]:.0%}) | "
              f"{r['pipeline_seconds']} |")
    wins = sum(r["pipeline"][0] < r["hog_logreg"][0] for r in results)
    print(f"pipeline below the HOG baseline's log loss on {wins} of {len(results)} seeds")


if __name__ == "__main__":
    main()
