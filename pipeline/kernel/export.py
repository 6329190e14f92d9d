"""The code competition's two folders, written from the chain's outputs by the submit stage:

- ``upload/``: the Kaggle dataset the notebook reads. Every fold model of every ensemble candidate (the
  notebook computes those of weight > 0; the others let a check rerun any model), the frozen conv base (``backbone.pt``: the dense
  heads' features and the smoothing neighbours), ``pipeline.zip`` (the project modules the prediction
  code imports, nothing else) and ``pipeline-kernel.json``: the competition's class order and test
  layout, the preprocessing, the settings the forward passes use (model, augmentation, batch sizes,
  seed), each file's sha256 and test-time augmentation passes,
  the ensemble weights and mean, the smoothing k and the calibration, the package versions the
  pipeline ran with. ``dataset-metadata.json`` is the Kaggle client's.
- ``kernel/``: ``inference.py`` (``pipeline/kernel/script.py`` as it is) and the client's
  ``kernel-metadata.json``: the competition and the dataset as sources, no internet, the accelerator.

The figures come from where the stages recorded them: ensemble weights, mean and smoothing k from
``reports/stages/ensemble.json``, the applied calibration from ``calibrate.json``, each fine-tuned
network's test-time augmentation from its stage's figures, the preprocessing from the feature
cache's ``meta.json``. The weights figures are rounded to 6 decimals; hill climbing's are pick counts
over at most ``ensemble.hill_climb_steps`` picks, so the exact fractions are recovered.
"""

from __future__ import annotations

import ast
import io
import json
import os
import shutil
import zipfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

import pipeline
from pipeline.competition import read_competition
from pipeline.config import Config, model_stage
from pipeline.convfeatures.cache import load_meta
from pipeline.errors import StageError
from pipeline.io import atomic_dir, atomic_write_bytes, file_sha256, read_json
from pipeline.kernel import predict, script
from pipeline.models import create_backbone

DATASET_METADATA = "dataset-metadata.json"  # the kaggle client's names
KERNEL_METADATA = "kernel-metadata.json"
CODE_FILE = "inference.py"
BACKBONE_FILE = "backbone.pt"
FOLDER, UPLOAD, KERNEL = "kaggle", "upload", "kernel"  # <paths.reports>/kaggle/{upload,kernel}
UNKNOWN_OWNER = "your-kaggle-username"  # a dry run without submit.owner or credentials
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so equal sources give equal bytes (DVC hashes them)


# ---------------------------------------------------------------------------- the prediction code


def imported_project_modules(path: Path) -> set[str]:
    """``pipeline.*`` modules ``path`` imports (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pipeline":
                found |= {f"pipeline.{a.name}" for a in node.names}
            elif node.module.startswith("pipeline."):
                found.add(node.module)
    return found


def module_path(module: str, package_dir: Path) -> Path:
    relative = Path(*module.split(".")[1:])
    file = package_dir / relative.with_suffix(".py")
    return file if file.is_file() else package_dir / relative / "__init__.py"


def prediction_sources(package_dir: Path = Path(pipeline.__file__).parent) -> list[Path]:
    """The project files the notebook imports: ``pipeline.kernel.predict`` and its imports, transitively,
    with the packages' ``__init__.py``."""
    seen: set[str] = set()
    todo = ["pipeline.kernel.predict"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imported_project_modules(module_path(module, package_dir)))
    packages = {package_dir.joinpath(*m.split(".")[1:i], "__init__.py") for m in seen for i in range(1, m.count(".") + 1)}
    return sorted({module_path(m, package_dir) for m in seen} | packages)


def package_zip(package_dir: Path = Path(pipeline.__file__).parent) -> bytes:
    """The prediction code as an importable zip (``pipeline/...``), byte for byte the same for the same sources."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for file in prediction_sources(package_dir):
            name = "pipeline/" + file.relative_to(package_dir).as_posix()
            info = zipfile.ZipInfo(name, ZIP_TIME)
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
            archive.writestr(info, file.read_bytes())
    return buffer.getvalue()


# ---------------------------------------------------------------------------- what the stages recorded


def stage_figures(cfg: Config, stage: str) -> dict[str, Any]:
    path = cfg.paths.stage_metrics_file(stage)
    if not path.exists():
        raise StageError(f"{path} not found: run the {stage.split('@')[0]} stage first")
    return read_json(path)


def exact_weights(figures: dict[str, float], steps: int) -> dict[str, float]:
    """The ensemble's weights from its 6-decimal figures: pick counts over at most ``steps`` picks (or
    1/n each), recovered exactly; the figures as they are when they are not such fractions."""
    denominator = max(steps, len(figures))
    fractions = {name: Fraction(w).limit_denominator(denominator) for name, w in figures.items()}
    if sum(fractions.values()) == 1 and all(abs(float(f) - w) < 1e-6 for f, w in zip(fractions.values(), figures.values(), strict=True)):
        return {name: float(f) for name, f in fractions.items()}
    return dict(figures)


def tta_passes(cfg: Config, model: str, fold: int, half: int | None) -> int:
    """The augmented passes a fine-tuned network's test predictions averaged (``tta_used`` in its figures)."""
    figures = stage_figures(cfg, model_stage(model, fold))
    if model == "pseudo":
        iteration = figures["iterations"][f"iteration_{cfg.pseudo.iterations}"]
        figures = iteration if half is None else iteration["students"][f"half_{half}"]
    return cfg.ensemble.tta if figures.get("tta_used") else 0


def model_kind(cfg: Config, model: str) -> predict.Kind:
    if model == "head" or (model.startswith("member") and cfg.ensemble.member_model == "head"):
        return "head"
    return "cnn"


def network_files(cfg: Config, model: str, fold: int) -> list[tuple[Path, str, int | None]]:
    """(file the stage saved, name in the dataset, test half) of fold model ``fold`` of ``model``."""
    folder = cfg.paths.fold_models(model, fold)
    if model_kind(cfg, model) == "head":
        return [(folder / "head.pt", f"{model}-fold{fold}.pt", None)]
    if model == "pseudo" and cfg.pseudo.cross:
        return [(folder / f"model_half{h}.pt", f"{model}-fold{fold}-half{h}.pt", h) for h in (0, 1)]
    return [(folder / "model.pt", f"{model}-fold{fold}.pt", None)]


def check_preprocessing(source: Path, meta: dict[str, Any], input_size: list[int]) -> None:
    if "input_size" in meta and list(meta["input_size"]) != input_size:
        raise StageError(f"{source} was trained at input size {meta['input_size']}, the feature cache's is {input_size}: "
                         "rerun the features stage and the model stages")


# ---------------------------------------------------------------------------- writing


def place(source: Path, target: Path) -> None:
    """``target`` with ``source``'s bytes: a hard link when both are on one file system (a weights file
    runs to hundreds of MB; every writer of ``source`` replaces it by rename, never in place), else a copy."""
    if not source.is_file():
        raise StageError(f"{source} not found: run the stage that writes it")
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_upload(cfg: Config, folder: Path, owner: str) -> dict[str, Any]:
    """The dataset folder; returns its manifest."""
    competition = read_competition(cfg.paths.path("raw"))
    features = load_meta(cfg.paths.path("features"))
    ensemble, calibrate = stage_figures(cfg, "ensemble"), stage_figures(cfg, "calibrate")
    weights = exact_weights(ensemble["weights"], cfg.ensemble.hill_climb_steps)
    models = []
    for model, weight in weights.items():
        folds = []
        for fold in cfg.split.fold_ids:
            shipped = []
            for source, name, half in network_files(cfg, model, fold):
                place(source, folder / name)
                meta = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True).get("meta", {})
                check_preprocessing(source, meta, list(features["input_size"]))
                tta = tta_passes(cfg, model, fold, half) if model_kind(cfg, model) == "cnn" else 0
                shipped.append({"file": name, "sha256": file_sha256(folder / name), "half": half, "tta": tta})
            folds.append(shipped)
        models.append({"name": model, "kind": model_kind(cfg, model), "weight": weight, "folds": folds})
    smoothing_k = int(ensemble.get("smoothing_k") or 0)
    backbone = None
    if smoothing_k or any(m["kind"] == "head" for m in models):
        state = {k: v.contiguous() for k, v in create_backbone(cfg.model).state_dict().items()}
        buffer = io.BytesIO()
        torch.save({"state_dict": state, "meta": {"arch": cfg.model.arch, "weights": cfg.model.weights}}, buffer)
        atomic_write_bytes(folder / BACKBONE_FILE, buffer.getvalue())
        backbone = {"file": BACKBONE_FILE, "sha256": file_sha256(folder / BACKBONE_FILE)}
    atomic_write_bytes(folder / script.PACKAGE_ZIP, package_zip())
    manifest = {
        "format": predict.MANIFEST_FORMAT,
        "competition": {"slug": cfg.ingest.competition, "id_column": competition.id_column,
                        "classes": list(competition.classes), "test_dir": cfg.competition.test_dir,
                        "filename": cfg.competition.filename, "sample_submission": cfg.competition.sample_submission},
        "preprocessing": {key: features[key] for key in ("arch", "width_divisor", "weights", "input_size", "mean", "std",
                                                         "grid", "feature_dim")}
                         | {"decode": "pipeline.data.decode_image: reduced-DCT JPEG decode, resize to input_size, RGB uint8; "
                                      "the model normalises with mean and std"},
        "settings": {"model": cfg.model.model_dump(mode="json"), "augment": cfg.augment.model_dump(mode="json"),
                     "features_batch": cfg.features.batch_size, "augment_seed": cfg.features.seed,
                     "cnn_batch": cfg.finetune.batch_size * 2},
        "backbone": backbone,
        "models": models,
        "ensemble": {"mean": ensemble.get("mean", cfg.ensemble.mean), "smoothing_k": smoothing_k,
                     "weights_figures": ensemble["weights"]},
        "calibration": {key: float(calibrate[key]) for key in ("temperature", "clip_lo", "clip_hi")},
        "environment": script.installed_versions(),
    }
    # The notebook checks every file it names: a manifest that describes other bytes is refused there too.
    predict.manifest_from_json(json.loads(json.dumps(manifest)))
    (folder / script.MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    dataset = cfg.submit.dataset_slug(cfg.ingest.competition)
    metadata = {"title": dataset, "id": f"{owner}/{dataset}", "licenses": [{"name": "CC0-1.0"}]}
    (folder / DATASET_METADATA).write_text(json.dumps(metadata, indent=1) + "\n")
    return manifest


def kernel_metadata(cfg: Config, owner: str) -> dict[str, Any]:
    kernel = cfg.submit.kernel_slug(cfg.ingest.competition)
    return {
        "id": f"{owner}/{kernel}",
        "title": kernel,
        "code_file": CODE_FILE,
        "language": "python",
        "kernel_type": "script",
        "is_private": True,
        "enable_gpu": cfg.submit.accelerator == "gpu",
        "enable_tpu": False,
        "enable_internet": False,
        "competition_sources": [cfg.ingest.competition],
        "dataset_sources": [f"{owner}/{cfg.submit.dataset_slug(cfg.ingest.competition)}"],
        "kernel_sources": [],
        "model_sources": [],
    }


def code_folder(cfg: Config) -> Path:
    """Where the submit stage writes a code competition's ``upload/`` and ``kernel/``, next to its record
    of the submission (``reports/submission.json``)."""
    return cfg.paths.path("reports") / FOLDER


def write_code_submission(cfg: Config, owner: str | None) -> dict[str, Any]:
    """``code_folder`` with ``upload/`` and ``kernel/``, built in a temp sibling and swapped in whole;
    returns the folders, the notebook's and the dataset's references and the manifest."""
    owner = owner or UNKNOWN_OWNER
    out = code_folder(cfg)
    with atomic_dir(out) as tmp:
        (tmp / UPLOAD).mkdir()
        (tmp / KERNEL).mkdir()
        manifest = write_upload(cfg, tmp / UPLOAD, owner)
        shutil.copyfile(script.__file__, tmp / KERNEL / CODE_FILE)
        metadata = kernel_metadata(cfg, owner)
        (tmp / KERNEL / KERNEL_METADATA).write_text(json.dumps(metadata, indent=1) + "\n")
    return {"upload": out / UPLOAD, "kernel": out / KERNEL, "kernel_ref": metadata["id"],
            "dataset_ref": metadata["dataset_sources"][0], "manifest": manifest}
