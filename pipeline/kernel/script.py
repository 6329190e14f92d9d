"""Kaggle notebook of a code competition: predicts the competition's test images with the chain's models
shipped in the dataset beside it and writes submission.csv, without internet.

The submit stage copies this file as the notebook's code file (pipeline/kernel/export.py). It imports
nothing of the project until it has put the shipped package (``pipeline.zip`` in the dataset) first on
sys.path, and checks at the end that every project module came from there. It needs only packages
Kaggle's image has: ``REQUIREMENTS`` below, checked before anything else runs.

Locally, against a folder laid out as Kaggle mounts it (``<input>/<dataset>/pipeline-kernel.json``,
``<input>/<competition>/sample_submission.csv`` and the test images):

    python inference.py --input <input> --output <folder>      (or PIPELINE_KAGGLE_INPUT, PIPELINE_KAGGLE_OUTPUT)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from importlib import import_module
from pathlib import Path

MANIFEST_FILE = "pipeline-kernel.json"  # in the dataset: what to run, written by pipeline/kernel/export.py
PACKAGE_ZIP = "pipeline.zip"  # in the dataset: the project's prediction code
SUBMISSION_FILE = "submission.csv"  # what Kaggle scores, in the working folder
INPUT_ENV, OUTPUT_ENV = "PIPELINE_KAGGLE_INPUT", "PIPELINE_KAGGLE_OUTPUT"
KAGGLE_INPUT, KAGGLE_WORKING = "/kaggle/input", "/kaggle/working"
# import name -> (package, oldest version the prediction code runs with). Kaggle's Python image (2025)
# has torch 2.6+, timm 1.0, albumentations 2.0, opencv 4.11, numpy 2.0, pandas 2.2, pydantic 2.11,
# PyYAML 6.0, scikit-learn 1.2. Not Lightning (only pytorch-lightning), Prefect or DVC: the prediction
# code imports none of them.
REQUIREMENTS = {
    "torch": ("torch", "2.1"),
    "timm": ("timm", "1.0"),
    "numpy": ("numpy", "1.26"),
    "pandas": ("pandas", "2.0"),
    "albumentations": ("albumentations", "2.0"),  # the test-time augmentation's API (Affine's fill, seeded Compose)
    "cv2": ("opencv-python", "4.8"),
    "pydantic": ("pydantic", "2.5"),
    "yaml": ("PyYAML", "6.0"),
    "sklearn": ("scikit-learn", "1.2"),
}
# Kaggle has no internet in a code competition: nothing may try to reach it.
OFFLINE_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}


class NotebookError(RuntimeError):
    """Something the notebook cannot run with: reported as one line, exit status 1."""


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def installed_versions() -> dict[str, str]:
    """Each required package's version; a NotebookError naming every one missing or too old."""
    found, problems = {}, []
    for module, (package, oldest) in REQUIREMENTS.items():
        try:
            imported = import_module(module)
        except ImportError as err:
            problems.append(f"{package} is not installed ({err})")
            continue
        version = str(getattr(imported, "__version__", None) or getattr(imported, "VERSION", "0"))
        found[package] = version
        if version_tuple(version) < version_tuple(oldest):
            problems.append(f"{package} {version} is older than {oldest}")
    if problems:
        raise NotebookError("this image lacks what the prediction code needs: " + "; ".join(problems) +
                            f". Required: {', '.join(f'{p}>={v}' for p, v in REQUIREMENTS.values())}")
    return found


def find_upload(input_root: Path) -> Path:
    """The dataset folder holding the manifest: ``<input>/<dataset>`` (or one level deeper)."""
    found = sorted({p.parent for pattern in (f"*/{MANIFEST_FILE}", f"*/*/{MANIFEST_FILE}", f"*/*/*/{MANIFEST_FILE}")
                    for p in input_root.glob(pattern)})
    if not found:
        raise NotebookError(f"no {MANIFEST_FILE} under {input_root}: attach the models dataset the submit stage "
                            "uploaded (kernel-metadata.json's dataset_sources)")
    if len(found) > 1:
        raise NotebookError(f"several models datasets under {input_root}: {', '.join(map(str, found))}; attach one")
    return found[0]


def use_shipped_package(upload: Path) -> Path:
    """Put the dataset's ``pipeline.zip`` first on sys.path and check ``pipeline`` comes from it."""
    package = upload / PACKAGE_ZIP
    if not package.is_file():
        raise NotebookError(f"{package} not found: the dataset is incomplete; rerun the submit stage")
    sys.path.insert(0, str(package))
    for name in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
        del sys.modules[name]  # a project installed in the image must not shadow the shipped one
    return package


def foreign_modules(package: Path) -> list[str]:
    """Project modules imported from anywhere but the shipped package."""
    inside = str(package) + os.sep
    return sorted(name for name, module in sys.modules.items()
                  if (name == "pipeline" or name.startswith("pipeline.")) and not str(getattr(module, "__file__", "")).startswith(inside))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Write submission.csv from the models dataset, offline.")
    parser.add_argument("--input", type=Path, default=Path(os.environ.get(INPUT_ENV, KAGGLE_INPUT)),
                        help=f"where Kaggle mounts the competition and the dataset (default {KAGGLE_INPUT}, or ${INPUT_ENV})")
    parser.add_argument("--output", type=Path, default=Path(os.environ.get(OUTPUT_ENV, KAGGLE_WORKING)),
                        help=f"where submission.csv goes (default {KAGGLE_WORKING}, or ${OUTPUT_ENV})")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one), cpu or cuda")
    parser.add_argument("--workers", type=int, default=None, help="image loader processes (default: up to 4)")
    return parser.parse_known_args(argv)[0]  # a notebook runner may pass arguments of its own


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    args = parse_args(argv)
    try:
        upload = find_upload(args.input)
        versions = installed_versions()
        print("packages: " + ", ".join(f"{name} {version}" for name, version in versions.items()), flush=True)
        package = use_shipped_package(upload)
        from pipeline.errors import StageError
        from pipeline.kernel.predict import write_notebook_submission

        try:
            summary = write_notebook_submission(upload, MANIFEST_FILE, args.input, args.output / SUBMISSION_FILE,
                                                args.device, args.workers, versions)
        except StageError as err:
            raise NotebookError(str(err)) from None
        if foreign := foreign_modules(package):
            raise NotebookError(f"project modules imported from outside {package}: {', '.join(foreign)}")
    except NotebookError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(summary, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
