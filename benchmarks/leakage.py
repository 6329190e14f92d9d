"""Is the synthetic dataset a fair stand-in? Baselines scored three ways, side by side.

A random image-level split should look far better than held-out whole drivers (the leak the real
data has), and held-out-driver validation should land near the hidden test score. Also printed: how
often an image's nearest neighbour is the same driver / class (real data: ~100% / 99.5%).

    python benchmarks/leakage.py [--preset demo|smoke|full] [--seed N] [--no-cnn] [--data DIR --hidden DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, KFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.metrics import accuracy, kaggle_logloss
from pipeline.synthetic.drivers import CLASSES, generate, preset_config

N_FOLDS = 4  # 12 demo drivers -> 3 held out per fold, like split.valid_groups in the demo profile
Fit = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # (x_train, y_train, x_eval) -> probs


def load_images(folder: Path, names: list[str], size: tuple[int, int]) -> np.ndarray:
    """Images as float arrays (n, h, w, 3) in [0, 1], area-downscaled to ``size`` (w, h)."""
    out = np.empty((len(names), size[1], size[0], 3), dtype=np.float32)
    for i, name in enumerate(names):
        with Image.open(folder / name) as im:
            out[i] = np.asarray(im.convert("RGB").resize(size, Image.BOX), dtype=np.float32) / 255
    return out


def load_dataset(data: Path, hidden: Path, size: tuple[int, int]) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame, np.ndarray]:
    train = pd.read_csv(data / "driver_imgs_list.csv")
    test = pd.read_csv(hidden / "test_labels.csv")
    x_train = load_images(data / "imgs" / "train", [f"{c}/{i}" for c, i in zip(train.classname, train.img, strict=True)], size)
    x_test = load_images(data / "imgs" / "test", list(test.img), size)
    return train, x_train, test, x_test


def labels(df: pd.DataFrame) -> np.ndarray:
    return df.classname.map({c: i for i, c in enumerate(CLASSES)}).to_numpy()


def fit_logreg(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray) -> np.ndarray:
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    model.fit(x_train.reshape(len(x_train), -1), y_train)
    probs = np.zeros((len(x_eval), len(CLASSES)))
    probs[:, model.classes_] = model.predict_proba(x_eval.reshape(len(x_eval), -1))
    return probs


def fit_small_cnn(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, epochs: int = 40) -> np.ndarray:
    """A strided stem, three conv blocks and global pooling, trained from scratch with light
    shift/brightness jitter (the strided, pooled stem keeps it to seconds per fit on a 2-core CPU)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    torch.set_num_threads(2)

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    stem = nn.Sequential(nn.Conv2d(3, 24, 5, stride=2, padding=2), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2))
    net = nn.Sequential(stem, block(24, 48), block(48, 64), block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Dropout(0.3), nn.Linear(64, len(CLASSES)))
    mean = x_train.mean(axis=(0, 1, 2))
    to_tensor = lambda x: torch.from_numpy(np.ascontiguousarray(((x - mean) / 0.25).transpose(0, 3, 1, 2)))  # noqa: E731
    xt, yt = to_tensor(x_train), torch.from_numpy(np.array(y_train, dtype=np.int64))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * ((len(xt) + 31) // 32))
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(xt), generator=gen).split(32):
            xb = xt[idx]
            # Shift up to 4 px and jitter brightness: cheap stand-ins for the pipeline's augmentation.
            dx, dy = (int(v) for v in torch.randint(-4, 5, (2,), generator=gen))
            xb = torch.roll(xb, (dy, dx), dims=(2, 3)) * (1 + 0.2 * (torch.rand(len(xb), 1, 1, 1, generator=gen) - 0.5))
            loss = nn.functional.cross_entropy(net(xb), yt[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        return torch.softmax(net(to_tensor(x_eval)), dim=1).double().numpy()


def cross_validate(fit: Fit, x: np.ndarray, y: np.ndarray, folds: Iterator[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """Out-of-fold log loss and accuracy over all images."""
    probs = np.zeros((len(x), len(CLASSES)))
    for train_idx, valid_idx in folds:
        probs[valid_idx] = fit(x[train_idx], y[train_idx], x[valid_idx])
    return kaggle_logloss(probs, y), accuracy(probs, y)


def score_three_ways(fit: Fit, train: pd.DataFrame, x_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> dict[str, tuple[float, float]]:
    y = labels(train)
    random_folds = KFold(N_FOLDS, shuffle=True, random_state=0).split(x_train)
    driver_folds = GroupKFold(N_FOLDS).split(x_train, groups=train.subject)
    test_probs = fit(x_train, y, x_test)
    return {
        "random image split": cross_validate(fit, x_train, y, random_folds),
        "held-out drivers": cross_validate(fit, x_train, y, driver_folds),
        "hidden test": (kaggle_logloss(test_probs, y_test), accuracy(test_probs, y_test)),
    }


def nearest_neighbour_agreement(train: pd.DataFrame, x: np.ndarray) -> tuple[float, float]:
    """Share of train images whose nearest other image is the same driver, and the same class."""
    flat = x.reshape(len(x), -1)
    sq = (flat**2).sum(1)
    dist = sq[:, None] + sq[None, :] - 2 * flat @ flat.T
    np.fill_diagonal(dist, np.inf)
    nn_idx = dist.argmin(1)
    subjects, classes = train.subject.to_numpy(), train.classname.to_numpy()
    return float(np.mean(subjects[nn_idx] == subjects)), float(np.mean(classes[nn_idx] == classes))


def print_table(rows: dict[str, dict[str, tuple[float, float]]]) -> None:
    splits = ["random image split", "held-out drivers", "hidden test"]
    print(f"{'model':<28}" + "".join(f"{s:>26}" for s in splits))
    print(f"{'':<28}" + "".join(f"{'logloss   acc':>26}" for _ in splits))
    for model, scores in rows.items():
        print(f"{model:<28}" + "".join(f"{scores[s][0]:>17.3f}{scores[s][1]:>8.1%} " for s in splits))


def run(data: Path, hidden: Path, cnn: bool) -> None:
    train, x_small, test, x_test_small = load_dataset(data, hidden, (16, 12))
    y_test = labels(test)
    print(f"train {len(train)} images / {train.subject.nunique()} drivers; hidden test {len(test)} images / "
          f"{test.subject.nunique()} drivers; chance accuracy 10%, uniform log loss {np.log(10):.3f}")
    same_driver, same_class = nearest_neighbour_agreement(train, x_small)
    print(f"nearest neighbour (16x12 pixels): same driver {same_driver:.1%}, same class {same_class:.1%}\n")
    rows = {}
    start = time.perf_counter()
    rows["logreg 16x12 colour pixels"] = score_three_ways(fit_logreg, train, x_small, x_test_small, y_test)
    print(f"(logreg: {time.perf_counter() - start:.1f} s)")
    if cnn:
        start = time.perf_counter()
        _, x_big, _, x_test_big = load_dataset(data, hidden, (64, 48))
        rows["small CNN 64x48"] = score_three_ways(fit_small_cnn, train, x_big, x_test_big, y_test)
        print(f"(small CNN: {time.perf_counter() - start:.1f} s)")
    print_table(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=("demo", "smoke", "full"), default="demo")
    parser.add_argument("--seed", type=int, default=None, help="generator seed (default: the preset's)")
    parser.add_argument("--no-cnn", dest="cnn", action="store_false", help="skip the small CNN rows")
    parser.add_argument("--data", type=Path, help="an existing competition folder (skips generation)")
    parser.add_argument("--hidden", type=Path, help="its hidden labels folder (with --data)")
    args = parser.parse_args(argv)
    if args.data:
        run(args.data, args.hidden, args.cnn)
        return
    cfg = preset_config(args.preset)
    if args.seed is not None:
        cfg = cfg.model_copy(update={"seed": args.seed})
    with tempfile.TemporaryDirectory() as tmp:
        figures = generate(cfg, Path(tmp) / "raw", Path(tmp) / "hidden")
        print(f"generated {args.preset} (seed {cfg.seed}): {figures}")
        run(Path(tmp) / "raw", Path(tmp) / "hidden", args.cnn)


if __name__ == "__main__":
    main()
