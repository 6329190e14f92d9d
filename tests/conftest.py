"""Shared fixtures: tests shrink the real `smoke` profile and write under tmp dirs."""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import Config, load_profile
from pipeline.env import set_offline_env

set_offline_env()
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def smoke_cfg(tmp_path) -> Config:
    """The smoke profile with every artifact path under a fresh tmp dir."""
    return load_profile("smoke").at(tmp_path)


def with_validation(cfg: Config, validation: str) -> Config:
    """``cfg`` in ``cv`` or ``holdout`` mode (``split.fold_ids`` re-derived)."""
    split = cfg.split.model_dump() | {"validation": validation, "fold_ids": None}
    return cfg.model_copy(update={"split": type(cfg.split)(**split)})


def csv_smoke_overrides(n_train: int = 60, n_test: int = 24) -> dict:
    """The smoke profile moved onto the CSV layout: demo-csv's real competition spec and source (read
    from configs/demo-csv.yaml, not restated), a tiny shapes dataset, square inputs."""
    import yaml

    from pipeline.config import CONFIG_DIR

    csv = yaml.safe_load((CONFIG_DIR / "demo-csv.yaml").read_text())
    return {"competition": csv["competition"], "ingest.source": csv["ingest"]["source"],
            "ingest.shapes.n_train": n_train, "ingest.shapes.n_test": n_test, "model.input_size": [32, 32],
            "split.valid_fraction": csv["split"]["valid_fraction"]}


@pytest.fixture
def csv_cfg(tmp_path) -> Config:
    """The smoke profile on the CSV layout (no groups, 5 string-named classes), under a tmp dir."""
    return load_profile("smoke", csv_smoke_overrides()).at(tmp_path)


# Deterministic outputs of a run, compared byte for byte (timings live in reports/ and models/ logs).
COMPARED_OUTPUTS = ("data/features", "data/predictions", "submissions")


def output_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in COMPARED_OUTPUTS for p in sorted((root / folder).rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class SmokeRun:
    root: Path
    digests: dict[str, str]  # as the uninterrupted run left them
    submission: bytes
    log: str  # what the `dvc repro` printed


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    """One uninterrupted `dvc repro` of the smoke profile on a fresh checkout, made once for the tests that
    compare against it (fault injection works in its checkout and restores it; fan-out compares with its
    submission; test_flow works on a copy)."""
    from test_flow import fresh_checkout, sh

    root = fresh_checkout(tmp_path_factory.mktemp("smoke-run"), "--profile", "smoke")
    log = sh([sys.executable, "-m", "dvc", "repro"], root)
    return SmokeRun(root, output_digests(root), (root / "submissions/submission.csv").read_bytes(), log)
