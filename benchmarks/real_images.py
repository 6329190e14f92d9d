"""Does the CPU profile learn real images, and does it beat a classic baseline? Two kinds of real
images rendered into State Farm's exact Kaggle layout (imgs/train/c0..c9, imgs/test,
driver_imgs_list.csv, sample_submission.csv), with groups as the "drivers" (test groups never seen in
training), then the whole chain (``cpu`` profile by default, ``ingest.source: dir``) against two classic
baselines on the same split: HOG features + logistic regression and raw pixels + logistic
regression. Hidden-test log loss and accuracy side by side, per seed.

    python benchmarks/real_images.py --kind digits --seeds 0 1 2 [--profile cpu] [--set KEY=VALUE ...] [--workdir DIR] [--out results.json]
    python benchmarks/real_images.py --kind photos --seeds 0 1 2 [--profile cpu] [--set KEY=VALUE ...] [--workdir DIR] [--out results.json]

``--kind digits`` (the default): scikit-learn's 1,797 real 8x8 handwritten digit scans, the class is
the digit. Each scan upscaled to 64x64, on a 96x96 canvas; the groups are 30 "writers" (8 in test),
each with its own ink colour, stroke weight (a max filter), background tone, offset and slant, and
every image its own jitter and JPEG noise: near-duplicate style within a writer.

``--kind photos``: the real photographs packaged here (scikit-learn's china.jpg and flower.jpg,
matplotlib's grace_hopper.jpg) as a 10-class scene-region task: sky, pagoda, lake, foliage, dahlia
petals, blurred leaves, face, flag, uniform, studio backdrop (``REGIONS``). Every image is a 96x96
view sampled inside its class's region at a random position, scale (0.6-1.4 of 64 source pixels) and
small rotation, with brightness, contrast and saturation jitter, noise and JPEG compression. The
groups are 20 "cameras" (4 in test), 150 images each (3,000 in all): group g only sees views centred
on strip g of 20 along every region's longer side, through its own colour cast and exposure, so test
groups show sub-areas and casts never seen in training.

Each run keeps its test labels in ``run_<kind><seed>/data/hidden/test_labels.csv`` (written after the
run) for ``benchmarks/submission_estimate.py``.
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
    write_lists(root, table)
    return table


def write_lists(root: Path, table: pd.DataFrame) -> None:
    """driver_imgs_list.csv (the train images) and sample_submission.csv (the test images)."""
    train = table[table["split"] == "train"]
    train[["subject", "classname", "img"]].to_csv(root / "driver_imgs_list.csv", index=False)
    test = table[table["split"] == "test"]
    pd.DataFrame({"img": test["img"], **{c: 0.1 for c in CLASSES}}).to_csv(root / "sample_submission.csv", index=False)


# ---------------------------------------------------------------------------- the photographs


def photographs() -> dict[str, Image.Image]:
    """The real photographs packaged here: scikit-learn's two sample images (640x427) and matplotlib's
    portrait of Grace Hopper (512x600)."""
    from matplotlib import cbook
    from sklearn.datasets import load_sample_images

    china, flower = (Image.fromarray(image) for image in load_sample_images().images)
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as grace:
        return {"china": china, "flower": flower, "grace": grace.convert("RGB")}


# one scene region per class: (photograph, [(x0, y0, x1, y1), ...]); a class with two boxes draws from both
REGIONS = [
    ("china", [(330, 0, 630, 135)]),                           # c0 hazy sky
    ("china", [(85, 80, 340, 370)]),                           # c1 pagoda: tiled eaves, red columns
    ("china", [(360, 225, 545, 287)]),                         # c2 lake with boats
    ("china", [(340, 320, 640, 427), (565, 160, 640, 320)]),   # c3 foliage
    ("flower", [(205, 115, 415, 325)]),                        # c4 dahlia petals
    ("flower", [(0, 0, 170, 427), (465, 0, 640, 370)]),        # c5 blurred dark-teal leaves
    ("grace", [(185, 150, 335, 330)]),                         # c6 face and glasses
    ("grace", [(0, 0, 150, 340)]),                             # c7 flag: stars and stripes
    ("grace", [(40, 400, 210, 600), (330, 400, 505, 490)]),    # c8 dark uniform
    ("grace", [(375, 0, 512, 320)]),                           # c9 blue studio backdrop
]
CROP = 64  # source pixels per 96-pixel image at scale 1


def photo_crop(photo: Image.Image, box: tuple[int, int, int, int], strip: tuple[float, float],
               rng: np.random.Generator) -> Image.Image:
    """A 96x96 view of ``photo`` centred inside ``box``, its centre in the ``strip`` fraction of the box's
    longer side; random scale (0.6-1.4), rotation and position."""
    x0, y0, x1, y1 = box
    angle = np.deg2rad(rng.normal(0, 8))
    spread = abs(np.cos(angle)) + abs(np.sin(angle))  # the rotated view's extent per unit side
    side = float(np.clip(CROP * rng.uniform(0.6, 1.4), 24, min(x1 - x0, y1 - y0) / spread))
    lo, hi = strip
    t = rng.uniform(lo, hi)
    if x1 - x0 >= y1 - y0:
        cx, cy = x0 + t * (x1 - x0), rng.uniform(y0, y1)
    else:
        cx, cy = rng.uniform(x0, x1), y0 + t * (y1 - y0)
    half = side * spread / 2  # the whole rotated view inside the region
    cx, cy = float(np.clip(cx, x0 + half, x1 - half)), float(np.clip(cy, y0 + half, y1 - half))
    k = side / SIZE  # output pixel (u, v) -> source centre + k * R(angle) (u - 48, v - 48)
    cos, sin = k * np.cos(angle), k * np.sin(angle)
    h = SIZE / 2
    data = (cos, -sin, cx - cos * h + sin * h, sin, cos, cy - sin * h - cos * h)
    return photo.transform((SIZE, SIZE), Image.AFFINE, data, resample=Image.BICUBIC)


def photo_style(rng: np.random.Generator) -> dict[str, Any]:
    """A group's camera: colour cast (per-channel gain) and exposure."""
    return {"gain": rng.uniform(0.8, 1.2, 3), "exposure": float(rng.uniform(0.7, 1.3))}


def develop(view: Image.Image, style: dict[str, Any], rng: np.random.Generator) -> Image.Image:
    """The group's cast and exposure, then per-image brightness, contrast and saturation jitter and noise."""
    x = np.asarray(view, dtype=np.float32) * style["gain"] * style["exposure"] * rng.uniform(0.85, 1.15)
    grey = x.mean(axis=2, keepdims=True)
    x = grey + (x - grey) * rng.uniform(0.7, 1.3)  # saturation
    x = x.mean() + (x - x.mean()) * rng.uniform(0.8, 1.2)  # contrast
    x = x + rng.normal(0, 4, x.shape)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def write_photo_competition(root: Path, seed: int, n_groups: int = 20, n_test_groups: int = 4,
                            per_class: int = 15) -> pd.DataFrame:
    """Real photographs in State Farm's layout under ``root``: ten scene regions (``REGIONS``) as the
    classes, ``per_class`` crops of each per group. Group g ("driver") sees only strip g of n_groups
    along every region's longer side, through its own colour cast and exposure, so a test group's
    crops are centred on strips and a camera no training group has. Same table as ``write_competition``."""
    photos = photographs()
    rng = np.random.default_rng(seed)
    test_groups = set(rng.choice(n_groups, n_test_groups, replace=False).tolist())
    styles = [photo_style(rng) for _ in range(n_groups)]
    rows = []
    for group in range(n_groups):
        strip = (group / n_groups, (group + 1) / n_groups)
        split = "test" if group in test_groups else "train"
        for label, (photo, boxes) in enumerate(REGIONS):
            areas = np.array([(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes], dtype=float)
            for _ in range(per_class):
                box = boxes[rng.choice(len(boxes), p=areas / areas.sum())]
                image = develop(photo_crop(photos[photo], box, strip, rng), styles[group], rng)
                name = f"img_{len(rows)}.jpg"
                rel = f"imgs/test/{name}" if split == "test" else f"imgs/train/c{label}/{name}"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                image.save(root / rel, quality=int(rng.integers(60, 95)))
                rows.append({"img": name, "classname": f"c{label}", "subject": f"g{group:03d}", "split": split,
                             "path": rel})
    table = pd.DataFrame(rows)
    write_lists(root, table)
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


def write_hidden_labels(run: Path, test: pd.DataFrame) -> None:
    """The test labels where a synthetic run keeps them (``data/hidden/test_labels.csv``), written after
    the run, so ``benchmarks/submission_estimate.py`` can score the run's estimates."""
    hidden = run / "data" / "hidden"
    hidden.mkdir(parents=True, exist_ok=True)
    test[["img", "classname", "subject"]].set_axis(["id", "label", "group"], axis=1).to_csv(hidden / "test_labels.csv", index=False)


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
    parser.add_argument("--kind", choices=["digits", "photos"], default="digits",
                        help="real handwritten digits (writers as groups) or photograph regions (strips as groups)")
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
            root = work / f"{args.kind}{seed}"
            table = (write_competition if args.kind == "digits" else write_photo_competition)(root, seed)
            test = table[table["split"] == "test"]
            labels = test["classname"].map(CLASSES.index).to_numpy()
            row: dict[str, Any] = {"kind": args.kind, "seed": seed, "n_train": int((table["split"] == "train").sum()),
                                   "n_test": len(test)}
            for name, featurise in (("hog_logreg", hog), ("pixels_logreg", pixels)):
                probs = baseline(table, root, featurise)
                row[name] = [kaggle_logloss(probs, labels), accuracy(probs, labels)]
            start = time.perf_counter()
            probs, figures = pipeline_probs(root, work / f"run_{args.kind}{seed}", args.profile, [*args.overrides, f"seed={seed}"], test["img"].tolist())
            row["pipeline"] = [kaggle_logloss(probs, labels), accuracy(probs, labels)]
            write_hidden_labels(work / f"run_{args.kind}{seed}", test)
            row["pipeline_cv_logloss"] = figures["calibrate"]["valid_logloss"]
            row["pipeline_seconds"] = round(time.perf_counter() - start, 1)
            row["models_cv"] = {m: f["valid_logloss"] for m, f in figures["oof"]["models"].items()}
            results.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    print("\n| kind | seed | pipeline (CV estimate) | pipeline test | HOG + logistic regression | pixels + logistic regression | pipeline s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['kind']} | {r['seed']} | {r['pipeline_cv_logloss']:.3f} | {r['pipeline'][0]:.3f} ({r['pipeline'][1]:.0%}) | "
              f"{r['hog_logreg'][0]:.3f} ({r['hog_logreg'][1]:.0%}) | {r['pixels_logreg'][0]:.3f} ({r['pixels_logreg'][1]:.0%}) | "
              f"{r['pipeline_seconds']} |")
    wins = sum(r["pipeline"][0] < r["hog_logreg"][0] for r in results)
    print(f"pipeline below the HOG baseline's log loss on {wins} of {len(results)} seeds")


if __name__ == "__main__":
    main()
