"""Code competitions (pipeline/kernel/): the spec says which kind a competition is; the notebook written
from the chain's outputs reproduces the pipeline's own submission offline, on a folder laid out as
Kaggle mounts it, importing only what it carries and what Kaggle's image has; a missing or changed
weight file or a changed class order fails loudly."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import chain
from pipeline.config import Config, ConfigError, load_params, load_profile
from pipeline.kernel import export, predict, script
from pipeline.metrics import read_predictions
from pipeline.registry import STAGES, stage_module

ROOT = Path(__file__).resolve().parent.parent
OWNER = "stub-user"
TOLERANCE = 1e-5  # per cell: the stages round every predictions file to 6 significant digits on the way
# Not on Kaggle's image (or not to be used there): the notebook's process refuses to import them.
NOT_ON_KAGGLE = ("lightning", "pytorch_lightning", "prefect", "dvc", "kaggle", "kagglesdk")
SITECUSTOMIZE = f'''
import socket, sys

BLOCKED = {NOT_ON_KAGGLE!r}


class NotOnKaggle:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not on Kaggle's image")
        return None


def network_off(*args, **kwargs):
    raise OSError("no internet in a code competition")


# The project itself is importable here only through the notebook's shipped package.
sys.meta_path[:] = [NotOnKaggle] + [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
socket.socket.connect = socket.create_connection = network_off
'''


# ---------------------------------------------------------------------------- the spec


def test_a_competition_is_a_file_competition_unless_the_spec_says_code():
    assert load_profile("smoke").competition.submission == "file"
    cfg = load_profile("smoke", {"competition.submission": "code"})
    assert cfg.competition.submission == "code"
    assert cfg.submit.dataset_slug(cfg.ingest.competition) == "state-farm-distracted-driver-detection-models"
    assert cfg.submit.kernel_slug(cfg.ingest.competition) == "state-farm-distracted-driver-detection-inference"
    assert len(cfg.submit.kernel_slug("x" * 60)) == 50


@pytest.mark.parametrize("override, message", [
    ({"competition.submission": "notebook"}, "competition.submission: Input should be 'file' or 'code'"),
    ({"submit.dataset": "Models"}, "submit.dataset: .*6-50 lower-case letters"),
    ({"submit.owner": "two words"}, "submit.owner: .*Kaggle username"),
])
def test_code_competition_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("smoke", override)


# ---------------------------------------------------------------------------- the same code as the stages


def test_the_chain_functions_are_the_stages_own():
    """The notebook applies pipeline.chain's functions; the stages define their own copies: equal bit for bit."""
    from pipeline.stages import calibrate, ensemble
    from pipeline.training import pseudo

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(5), size=(3, 40)) * rng.uniform(0.5, 2, size=(3, 40, 1))
    weights = np.array([3, 0, 4]) / 7
    for mean in ("arithmetic", "geometric"):
        assert np.array_equal(chain.combine(probs, weights, mean), ensemble.combine(probs, weights, mean))
    for fitted in [(1.0, 0.0, 1.0), (0.7, 0.0, 1.0), (1.3, 0.01, 0.93), (1.0, 0.02, 0.9)]:
        assert np.array_equal(chain.apply_calibration(probs[0], chain.Calibration(*fitted)),
                              calibrate.apply_calibration(probs[0], calibrate.Calibration(*fitted)))
    ids = [f"img_{i}.jpg" for i in rng.permutation(101)]
    assert np.array_equal(chain.image_halves(ids), pseudo.image_halves(ids))


def test_the_prediction_code_needs_nothing_kaggle_lacks(tmp_path):
    """pipeline.kernel.predict and everything it imports load without Lightning, Prefect, DVC or the
    kaggle client; the zip ships exactly those modules."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    code = "import json, sys, pipeline.kernel.predict; print(json.dumps([m for m in sys.modules if m.startswith('pipeline')]))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    with zipfile.ZipFile(io.BytesIO(export.package_zip())) as archive:
        shipped = {name.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for name in archive.namelist()}
    assert loaded <= shipped and "pipeline.kernel.predict" in shipped
    assert not [m for m in shipped if m == "pipeline.training" or m.startswith("pipeline.training.")]
    assert export.package_zip() == export.package_zip(), "the same sources give the same bytes"


# ---------------------------------------------------------------------------- the notebook on a smoke run


def run_chain(cfg: Config) -> None:
    """Every stage up to calibrate, in process, then the submission the submit stage builds."""
    from pipeline.submission.build import build_submission

    for name in STAGES:
        if name == "submit":
            break
        stage_module(name).run(cfg)
    build_submission(cfg.paths.path("predictions") / "calibrate" / "test.csv",
                     cfg.paths.path("raw") / cfg.competition.sample_submission, cfg.paths.path("submission"))


def kaggle_input(cfg: Config, upload: Path, dst: Path) -> Path:
    """``dst`` laid out as Kaggle mounts a code competition's notebook inputs: the competition's files
    under its slug, the models dataset under its slug."""
    competition = dst / cfg.ingest.competition
    raw = cfg.paths.path("raw")
    shutil.copytree(raw / cfg.competition.test_dir, competition / cfg.competition.test_dir)
    shutil.copy(raw / cfg.competition.sample_submission, competition / cfg.competition.sample_submission)
    shutil.copytree(upload, dst / cfg.submit.dataset_slug(cfg.ingest.competition))
    return dst


def run_notebook(kernel: Path, input_root: Path, working: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """The notebook's code file in a fresh process without the project on its path, offline."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    working.mkdir(parents=True, exist_ok=True)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_KAGGLE", "PYTHON"))},
           "PYTHONPATH": str(site), script.INPUT_ENV: str(input_root), script.OUTPUT_ENV: str(working)}
    return subprocess.run([sys.executable, str(kernel / export.CODE_FILE), "--device", "cpu", "--workers", "0"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)


def max_difference(ours: Path, notebooks: Path) -> float:
    a, b = pd.read_csv(ours, dtype={0: str}), pd.read_csv(notebooks, dtype={0: str})
    assert list(a.columns) == list(b.columns)
    assert a.iloc[:, 0].tolist() == b.iloc[:, 0].tolist()
    return float(np.abs(a.iloc[:, 1:].to_numpy() - b.iloc[:, 1:].to_numpy()).max())


@pytest.fixture(scope="module")
def exported(smoke_run, tmp_path_factory):
    """A copy of the session's smoke run (State Farm layout, `dvc repro`), its code competition folders
    written, and its test images and models laid out as Kaggle mounts them."""
    from conftest import copy_of

    root = copy_of(smoke_run, tmp_path_factory.mktemp("kernel") / "repo").root
    cfg = load_params(root / "params.yaml").model_copy(deep=True)
    cfg = cfg.model_copy(update={"competition": cfg.competition.model_copy(update={"submission": "code"})})
    folders = export.write_code_submission(cfg, OWNER)
    return cfg, folders, kaggle_input(cfg, folders["upload"], root / "kaggle" / "input")


@pytest.mark.slow
def test_the_notebook_reproduces_the_pipelines_submission_offline(exported, tmp_path):
    cfg, folders, input_root = exported
    done = run_notebook(folders["kernel"], input_root, tmp_path / "working", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    difference = max_difference(cfg.paths.path("submission"), tmp_path / "working" / script.SUBMISSION_FILE)
    print(f"max abs difference, notebook vs pipeline submission (State Farm layout): {difference:.3g}")
    assert difference <= TOLERANCE
    assert "packages: torch" in done.stdout


@pytest.mark.slow
def test_every_shipped_model_reproduces_its_stages_test_predictions(exported):
    """Whatever weights the ensemble gave them: each fold model (fine-tuned CNNs with their test-time
    augmentation, cross pseudo-labelling's two students, dense heads on the conv features, members)
    predicts the test images as its stage did."""
    cfg, folders, input_root = exported
    manifest = predict.read_manifest(folders["upload"], script.MANIFEST_FILE)
    ids, paths = predict.test_images(predict.find_competition(input_root, manifest), manifest)
    cpu = torch.device("cpu")
    features = predict.conv_features(manifest, folders["upload"], paths, cpu, 0)
    assert {m.name for m in manifest.models} == set(cfg.ensemble.models())
    assert any(f.half is not None for m in manifest.models for fold in m.folds for f in fold)
    assert {f.tta for m in manifest.models if m.kind == "cnn" for fold in m.folds for f in fold} == {cfg.ensemble.tta}
    for model in manifest.models:
        assert len(model.folds) == len(cfg.split.fold_ids)
        for fold, files in zip(cfg.split.fold_ids, model.folds, strict=True):
            got = predict.fold_prediction(manifest, model, files, folders["upload"], ids, paths, features, cpu, 0)
            stage_ids, stage_probs = read_predictions(cfg.paths.fold_predictions(model.name, fold) / "test.csv")
            assert stage_ids == ids
            assert np.abs(got - stage_probs).max() <= TOLERANCE, f"{model.name} fold {fold}"


def test_the_kernel_folder_is_a_private_offline_notebook_on_the_competition_and_the_models(exported):
    cfg, folders, _ = exported
    metadata = json.loads((folders["kernel"] / export.KERNEL_METADATA).read_text())
    kernel, dataset = cfg.submit.kernel_slug(cfg.ingest.competition), cfg.submit.dataset_slug(cfg.ingest.competition)
    assert metadata | {"enable_gpu": None} == {
        "id": f"{OWNER}/{kernel}", "title": kernel, "code_file": export.CODE_FILE, "language": "python",
        "kernel_type": "script", "is_private": True, "enable_gpu": None, "enable_tpu": False, "enable_internet": False,
        "competition_sources": [cfg.ingest.competition], "dataset_sources": [f"{OWNER}/{dataset}"],
        "kernel_sources": [], "model_sources": []}
    assert metadata["enable_gpu"] is (cfg.submit.accelerator == "gpu")
    assert (folders["kernel"] / export.CODE_FILE).read_bytes() == Path(script.__file__).read_bytes()
    upload = json.loads((folders["upload"] / export.DATASET_METADATA).read_text())
    assert upload["id"] == f"{OWNER}/{dataset}" and 6 <= len(upload["title"]) <= 50
    manifest = json.loads((folders["upload"] / script.MANIFEST_FILE).read_text())
    assert manifest["competition"]["classes"] == list(pd.read_csv(cfg.paths.path("submission"), nrows=0).columns[1:])
    assert set(manifest["calibration"]) == {"temperature", "clip_lo", "clip_hi"}
    assert {"smoothing_k", "mean"} <= set(manifest["ensemble"]) and manifest["preprocessing"]["input_size"] == [48, 64]


@pytest.mark.parametrize("damage", ["missing", "changed"])
def test_a_missing_or_changed_weight_file_fails_loudly(exported, tmp_path, damage):
    cfg, folders, input_root = exported
    broken = shutil.copytree(input_root, tmp_path / "input")
    weighted = next(m for m in predict.read_manifest(folders["upload"], script.MANIFEST_FILE).models if m.weight > 0)
    target = broken / cfg.submit.dataset_slug(cfg.ingest.competition) / weighted.folds[-1][0].file
    if damage == "missing":
        target.unlink()
    else:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    done = run_notebook(folders["kernel"], broken, tmp_path / "working", tmp_path)
    assert done.returncode == 1
    assert f"{target}" in done.stderr and ("not found" if damage == "missing" else "sha256 differs") in done.stderr
    assert not (tmp_path / "working" / script.SUBMISSION_FILE).exists()


def test_a_changed_class_order_fails_loudly(exported, tmp_path):
    cfg, folders, input_root = exported
    broken = shutil.copytree(input_root, tmp_path / "input")
    sample = broken / cfg.ingest.competition / cfg.competition.sample_submission
    table = pd.read_csv(sample, dtype=str)
    columns = list(table.columns)
    columns[1], columns[2] = columns[2], columns[1]
    table[columns].to_csv(sample, index=False)
    done = run_notebook(folders["kernel"], broken, tmp_path / "working", tmp_path)
    assert done.returncode == 1
    assert "the classes or their order differ" in done.stderr and str(sample) in done.stderr
    assert not (tmp_path / "working" / script.SUBMISSION_FILE).exists()


@pytest.mark.slow
def test_the_notebook_reproduces_the_csv_layouts_submission(tmp_path):
    """The second embedded competition (Kaggle's CSV layout: flat test folder, ``{id}.jpg``, string classes)."""
    from conftest import csv_smoke_overrides

    cfg = load_profile("smoke", {**csv_smoke_overrides(), "competition.submission": "code"}).at(tmp_path / "repo")
    run_chain(cfg)
    folders = export.write_code_submission(cfg, OWNER)
    input_root = kaggle_input(cfg, folders["upload"], tmp_path / "input")
    done = run_notebook(folders["kernel"], input_root, tmp_path / "working", tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    difference = max_difference(cfg.paths.path("submission"), tmp_path / "working" / script.SUBMISSION_FILE)
    print(f"max abs difference, notebook vs pipeline submission (CSV layout): {difference:.3g}")
    assert difference <= TOLERANCE
