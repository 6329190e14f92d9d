"""The chain's test-time computation, as the code-competition notebook runs it on Kaggle: every fold
model the ensemble weighs predicts the test images (fine-tuned CNNs with their test-time augmentation passes, dense
heads on the frozen conv base's features), each model's folds are averaged, the models combined with
the ensemble's weights, smoothed over each image's nearest test neighbours and calibrated, as the
``oof``, ``ensemble`` and ``calibrate`` stages did; ``pipeline.submission`` writes the file.

It builds on what the stages build on (``pipeline.models`` factories, ``pipeline.data`` decoding and
augmentation, ``pipeline.convfeatures.embed.embed_batches``, ``pipeline.ensembling.smoothing``, ``pipeline.chain``) and
imports nothing that needs Lightning, Prefect or DVC, which Kaggle's image lacks: the two forward
passes below follow ``pipeline.training.prediction.predict_rows`` and ``predict_features`` (which live beside the
Lightning training code) batch for batch.

The manifest (``pipeline-kernel.json`` in the dataset, written by ``pipeline.kernel.export``) names
every file with its sha256, the competition's class order, the preprocessing, the ensemble weights,
the smoothing k and the calibration. A missing or changed file, or a competition whose sample
submission lists other classes or another order, is refused before anything is predicted.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader

from pipeline.chain import Calibration, apply_calibration, combine, image_halves
from pipeline.config import AugmentConfig, ModelConfig
from pipeline.convfeatures.embed import embed_batches, resolve_device, softmax_batches
from pipeline.data import ImageRowsDataset, build_augmentation, seed_worker
from pipeline.ensembling.smoothing import nearest_neighbours, smooth_with_neighbours
from pipeline.errors import StageError
from pipeline.io import file_sha256, read_json
from pipeline.metrics import normalise
from pipeline.models import ConvBase, ConvNet, create_backbone, create_conv_base, create_dense_head
from pipeline.submission.build import read_sample, write_submission

MANIFEST_FORMAT = 1
Kind = Literal["cnn", "head"]  # a whole fine-tuned network on images, or a dense head on conv features
HEAD_BATCH = 1024  # pipeline.training.prediction.predict_features' batch


# ---------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class NetworkFile:
    """One network file of a fold model: which test images it predicts (``half`` of cross
    pseudo-labelling's students; None: all) and how many augmented passes join its plain one."""

    file: str
    sha256: str
    half: int | None = None
    tta: int = 0


@dataclass(frozen=True)
class ShippedModel:
    name: str  # head, finetune, pseudo, member<m>
    kind: Kind
    weight: float  # in the ensemble
    folds: tuple[tuple[NetworkFile, ...], ...]  # each fold model's files


@dataclass(frozen=True)
class Manifest:
    competition: str
    id_column: str
    classes: tuple[str, ...]
    test_dir: str
    filename: str
    sample_submission: str
    model: ModelConfig  # the backbone's architecture (every weight comes from a shipped file)
    augment: AugmentConfig  # the test-time augmentation's transforms
    features_batch: int  # features.batch_size: the frozen conv base's batches
    augment_seed: int  # features.seed: augmented copy k of an image is a function of (seed, k, file name)
    cnn_batch: int  # finetune.batch_size x 2: a fine-tuned network's prediction batches
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    grid: int
    backbone: NetworkFile | None  # the frozen conv base: dense heads' features and smoothing neighbours
    models: tuple[ShippedModel, ...]
    ensemble_mean: str
    smoothing_k: int
    calibration: Calibration
    environment: dict[str, str]  # package versions the pipeline ran with

    @property
    def header(self) -> list[str]:
        return [self.id_column, *self.classes]

    def files(self) -> list[NetworkFile]:
        shipped = [f for model in self.models for fold in model.folds for f in fold]
        return shipped + ([self.backbone] if self.backbone else [])


def network_file(data: dict[str, Any]) -> NetworkFile:
    return NetworkFile(str(data["file"]), str(data["sha256"]), data.get("half"), int(data.get("tta", 0)))


def manifest_from_json(data: dict[str, Any]) -> Manifest:
    if data.get("format") != MANIFEST_FORMAT:
        raise StageError(f"manifest format {data.get('format')!r}, this code reads {MANIFEST_FORMAT}: rerun the submit stage")
    comp, prep, ens, settings = data["competition"], data["preprocessing"], data["ensemble"], data["settings"]
    models = tuple(ShippedModel(m["name"], m["kind"], float(m["weight"]),
                                tuple(tuple(network_file(f) for f in fold) for fold in m["folds"]))
                   for m in data["models"])
    try:
        model, augment = ModelConfig.model_validate(settings["model"]), AugmentConfig.model_validate(settings["augment"])
    except ValidationError as err:
        raise StageError(f"the manifest's settings do not fit this code's config: {err}") from None
    return Manifest(comp["slug"], comp["id_column"], tuple(comp["classes"]), comp["test_dir"], comp["filename"],
                    comp["sample_submission"], model, augment, int(settings["features_batch"]),
                    int(settings["augment_seed"]), int(settings["cnn_batch"]),
                    tuple(prep["input_size"]), tuple(prep["mean"]), tuple(prep["std"]), int(prep["grid"]),
                    network_file(data["backbone"]) if data.get("backbone") else None, models, ens["mean"],
                    int(ens["smoothing_k"]), Calibration(**data["calibration"]), dict(data.get("environment", {})))


def read_manifest(upload: Path, manifest_file: str) -> Manifest:
    """The manifest, with every file it names present and unchanged (sha256)."""
    path = upload / manifest_file
    if not path.exists():
        raise StageError(f"{path} not found: the models dataset is incomplete; rerun the submit stage")
    manifest = manifest_from_json(read_json(path))
    for shipped in manifest.files():
        file = upload / shipped.file
        if not file.is_file():
            raise StageError(f"{file} not found: the models dataset lacks a weight file the ensemble uses; "
                             "rerun the submit stage and upload the dataset again")
        if file_sha256(file) != shipped.sha256:
            raise StageError(f"{file}: sha256 differs from {manifest_file}: a damaged or replaced weight file; "
                             "rerun the submit stage and upload the dataset again")
    return manifest


# ---------------------------------------------------------------------------- the test images


def find_competition(input_root: Path, manifest: Manifest) -> Path:
    """The competition's folder as Kaggle mounts it: ``<input>/<competition>`` (or under ``competitions/``)."""
    candidates = [input_root / manifest.competition, input_root / "competitions" / manifest.competition]
    for folder in candidates:
        if (folder / manifest.sample_submission).is_file():
            return folder
    present = ", ".join(sorted(p.name for p in input_root.iterdir())) if input_root.is_dir() else "nothing"
    raise StageError(f"no {manifest.sample_submission} in {' or '.join(map(str, candidates))} (found: {present}): "
                     f"add the competition {manifest.competition} as the notebook's input")


def test_images(competition_dir: Path, manifest: Manifest) -> tuple[list[str], list[str]]:
    """(ids, paths) of the test images the sample submission lists, in id order as ingest indexes them;
    refused when its classes or their order differ from the ones the models were trained on."""
    sample = competition_dir / manifest.sample_submission
    header, rows = read_sample(sample)
    if header != manifest.header:
        raise StageError(f"{sample}: header {','.join(header)}, but the models predict {','.join(manifest.header)}: "
                         "the classes or their order differ from the competition the chain was trained on; "
                         "retrain on this competition's files")
    ids = sorted(rows)
    paths = [str(competition_dir / manifest.test_dir / manifest.filename.replace("{id}", i)) for i in ids]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise StageError(f"{missing[0]} not found ({len(missing)} of {len(paths)} test images listed in {sample} missing)")
    return ids, paths


# ---------------------------------------------------------------------------- networks


def load_state(upload: Path, shipped: NetworkFile) -> dict[str, Any]:
    blob = torch.load(upload / shipped.file, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise StageError(f"{upload / shipped.file}: not a network file of this pipeline (no state_dict)")
    return blob


def structure(model: ModelConfig) -> ModelConfig:
    """The backbone's architecture without its weights: every weight comes from a shipped file."""
    return model.model_copy(update={"weights": "none", "weights_file": None})


def conv_base(manifest: Manifest, frozen: bool, backbone_state: dict[str, Any] | None = None) -> ConvBase:
    backbone = create_backbone(structure(manifest.model))
    if backbone_state is not None:
        backbone.load_state_dict(backbone_state)
    data_cfg = {"input_size": (3, *manifest.input_size), "mean": manifest.mean, "std": manifest.std}
    return create_conv_base(backbone, data_cfg, manifest.grid, frozen=frozen)


def check_classes(meta: dict[str, Any], manifest: Manifest, file: Path) -> None:
    if "classes" in meta and tuple(meta["classes"]) != manifest.classes:
        raise StageError(f"{file} was trained on the classes {','.join(meta['classes'])}, the manifest says "
                         f"{','.join(manifest.classes)}: rerun the submit stage")


def head_structure(meta: dict[str, Any]) -> nn.Sequential:
    return create_dense_head(meta["in_features"], meta["widths"], meta["dropout"], meta["num_classes"])


def dense_head(blob: dict[str, Any]) -> nn.Sequential:
    """The dense head a head stage (or head member) saved."""
    head = head_structure(blob["meta"])
    head.load_state_dict(blob["state_dict"])
    return head.eval()


def fine_tuned(manifest: Manifest, blob: dict[str, Any]) -> ConvNet:
    """The whole network a fine-tuning stage saved: a trainable conv base and its dense head."""
    network = ConvNet(conv_base(manifest, frozen=False), head_structure(blob["meta"]))
    network.load_state_dict(blob["state_dict"])
    return network.eval()


# ---------------------------------------------------------------------------- forward passes


@torch.no_grad()
def predict_images(network: nn.Module, paths: list[str], target_hw: tuple[int, int], batch_size: int, workers: int,
                   device: torch.device, copy: int = 0, augment: AugmentConfig | None = None, seed: int = 0) -> np.ndarray:
    """Softmax probabilities of the images, bf16 autocast and channels-last on CUDA; copy ``k >= 1``
    augmented as the features stage's copy k (``pipeline.training.prediction.predict_rows``)."""
    network = network.to(device).eval()
    cuda = device.type == "cuda"
    augmentation = build_augmentation(augment) if copy > 0 and augment is not None else None
    images = ImageRowsDataset(paths, target_hw, copies=[copy] * len(paths), augmentation=augmentation, seed=seed)
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers, worker_init_fn=seed_worker,
                        pin_memory=cuda)
    return softmax_batches(network, loader, device, channels_last=cuda)


@torch.no_grad()
def predict_features(head: nn.Module, features: np.ndarray) -> np.ndarray:
    """Softmax probabilities of a dense head on feature rows, on the CPU where the head stage ran it
    (``pipeline.training.prediction.predict_features``)."""
    out = [F.softmax(head(torch.as_tensor(features[i:i + HEAD_BATCH]).float()), dim=1)
           for i in range(0, len(features), HEAD_BATCH)]
    return torch.cat(out).double().numpy()


def conv_features(manifest: Manifest, upload: Path, paths: list[str], device: torch.device, workers: int) -> np.ndarray:
    """The frozen conv base's fp16 features of the images, batch for batch as the features stage cached them."""
    assert manifest.backbone is not None
    base = conv_base(manifest, frozen=True, backbone_state=load_state(upload, manifest.backbone)["state_dict"]).to(device)
    images = ImageRowsDataset(paths, manifest.input_size, copies=[0] * len(paths), seed=manifest.augment_seed)
    loader = DataLoader(images, batch_size=manifest.features_batch, shuffle=False, num_workers=workers,
                        worker_init_fn=seed_worker, pin_memory=device.type == "cuda")
    return np.concatenate(list(embed_batches(base, loader, device)))


def with_tta(network: nn.Module, paths: list[str], manifest: Manifest, passes: int, device: torch.device,
             workers: int) -> np.ndarray:
    """The plain pass, or its mean with ``passes`` augmented ones (``pipeline.training.prediction.tta_predictions``)."""
    batch = manifest.cnn_batch
    plain = predict_images(network, paths, manifest.input_size, batch, workers, device)
    augmented = [predict_images(network, paths, manifest.input_size, batch, workers, device, k, manifest.augment,
                                manifest.augment_seed) for k in range(1, passes + 1)]
    return np.mean([plain, *augmented], axis=0) if augmented else plain


def fold_prediction(manifest: Manifest, model: ShippedModel, files: tuple[NetworkFile, ...], upload: Path,
                    ids: list[str], paths: list[str], features: np.ndarray | None, device: torch.device,
                    workers: int) -> np.ndarray:
    """One fold model's test probabilities; cross pseudo-labelling's students each predict their half."""
    halves = image_halves(ids) if any(f.half is not None for f in files) else None
    out = np.zeros((len(ids), len(manifest.classes)), dtype=np.float32 if halves is not None else np.float64)
    for shipped in files:
        blob = load_state(upload, shipped)
        check_classes(blob.get("meta", {}), manifest, upload / shipped.file)
        rows = np.arange(len(ids)) if halves is None else np.flatnonzero(halves == shipped.half)
        if not len(rows):
            continue
        if model.kind == "head":
            assert features is not None
            out[rows] = predict_features(dense_head(blob), features[rows])
        else:
            out[rows] = with_tta(fine_tuned(manifest, blob), [paths[r] for r in rows], manifest, shipped.tta, device, workers)
    return out


# ---------------------------------------------------------------------------- the chain


def model_probabilities(manifest: Manifest, model: ShippedModel, upload: Path, ids: list[str], paths: list[str],
                        features: np.ndarray | None, device: torch.device, workers: int) -> np.ndarray:
    """A model's test probabilities: the mean of its fold models' (``oof``)."""
    folds = [fold_prediction(manifest, model, files, upload, ids, paths, features, device, workers) for files in model.folds]
    return normalise(np.mean([normalise(p) for p in folds], axis=0))


def ensemble_and_calibrate(manifest: Manifest, tests: dict[str, np.ndarray], features: np.ndarray | None) -> np.ndarray:
    """The weighted models combined and smoothed over test neighbours (``ensemble``), then calibrated
    (``calibrate``). A model of weight 0 adds nothing to the mean, so it need not be in ``tests``."""
    used = [m for m in manifest.models if m.weight > 0]
    probs = combine(np.stack([tests[m.name] for m in used]), np.array([m.weight for m in used]), manifest.ensemble_mean)
    if manifest.smoothing_k:
        assert features is not None
        probs = smooth_with_neighbours(probs, nearest_neighbours(features.astype(np.float32), manifest.smoothing_k))
    return apply_calibration(probs, manifest.calibration)


def chain_probabilities(manifest: Manifest, upload: Path, ids: list[str], paths: list[str], device: torch.device,
                        workers: int) -> np.ndarray:
    """What ``calibrate`` wrote for these test images, computed from the shipped files."""
    used = [m for m in manifest.models if m.weight > 0]
    needs_features = manifest.smoothing_k > 0 or any(m.kind == "head" for m in used)
    features = conv_features(manifest, upload, paths, device, workers) if needs_features else None
    tests = {m.name: model_probabilities(manifest, m, upload, ids, paths, features, device, workers) for m in used}
    return ensemble_and_calibrate(manifest, tests, features)


def version_notes(manifest: Manifest, versions: dict[str, str]) -> list[str]:
    """Packages whose version differs from the pipeline's: decoding and test-time augmentation may differ."""
    return [f"{name} {versions[name]} (the pipeline ran {ran})" for name, ran in manifest.environment.items()
            if name in versions and versions[name] != ran]


def write_notebook_submission(upload: Path, manifest_file: str, input_root: Path, out_path: Path,
                              device_name: str = "auto", workers: int | None = None,
                              versions: dict[str, str] | None = None) -> dict[str, Any]:
    """Predict the competition's test images with the chain shipped in ``upload`` (described by its
    ``manifest_file``) and write ``out_path``; returns the figures."""
    start = time.perf_counter()
    manifest = read_manifest(upload, manifest_file)
    competition_dir = find_competition(input_root, manifest)
    ids, paths = test_images(competition_dir, manifest)
    device = resolve_device(device_name)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    probs = chain_probabilities(manifest, upload, ids, paths, device, workers)
    rows = write_submission(ids, probs, competition_dir / manifest.sample_submission, out_path)
    return {"rows": rows, "submission": str(out_path), "device": device.type,
            "weights": {m.name: m.weight for m in manifest.models}, "smoothing_k": manifest.smoothing_k,
            "calibration": asdict(manifest.calibration),
            "version_differences": version_notes(manifest, versions or {}),
            "seconds": round(time.perf_counter() - start, 1)}
