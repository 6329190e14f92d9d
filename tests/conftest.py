"""Shared fixtures: tests shrink the real `smoke` profile and write under tmp dirs."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.config import Config, load_profile
from pipeline.env import set_offline_env

set_offline_env()
# Under pytest-xdist (`make test` runs two workers) each worker gets one thread and its own Prefect home
# (the ephemeral API's SQLite file): two workers on two cores, no oversubscribed OpenMP, no shared database.
# (OpenMP threads spin while they wait: two workers of two threads each made in-process training 10x slower.)
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:  # set, not defaulted: a worker inherits the controller's environment, this file's default included
    os.environ["OMP_NUM_THREADS"] = "1"
    if "PREFECT_HOME" in os.environ:
        home = Path(os.environ["PREFECT_HOME"]) / XDIST_WORKER
        home.mkdir(parents=True, exist_ok=True)  # Prefect makes only the last level, warning otherwise
        os.environ["PREFECT_HOME"] = str(home)
else:
    os.environ.setdefault("OMP_NUM_THREADS", "2")


# The long end-to-end files first, the longest first (xdist hands out whole files in this order, two to a
# worker to start: the fan-out cluster and the smoke run on one, the deployments on the other), then the
# rest as collected, filling in. Sorting is stable: within a file the order stays.
RUN_FIRST = ("test_fanout.py", "test_deployments.py", "test_flow.py", "test_faults.py", "test_benchmarks.py")
assert all((Path(__file__).parent / name).is_file() for name in RUN_FIRST), "RUN_FIRST names a file that is gone"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(RUN_FIRST)))


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
    """One uninterrupted `dvc repro` of the smoke profile on a fresh checkout, made once per session for the
    tests that compare against it, whichever xdist worker asks first (the others wait on a file lock and
    read it). Read-only to them: fault injection and test_flow work on copies (``copy_of``); fan-out
    compares with its submission."""
    from filelock import FileLock
    from test_flow import fresh_checkout, sh

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if XDIST_WORKER else base  # the workers' base temps are siblings
    root, log_file = shared / "smoke-run", shared / "smoke-run.log"
    with FileLock(str(shared / "smoke-run.lock")):
        if not log_file.exists():
            shutil.rmtree(root, ignore_errors=True)  # a failed attempt's leftovers
            root.mkdir()
            log_file.write_text(sh([sys.executable, "-m", "dvc", "repro"], fresh_checkout(root, "--profile", "smoke")))
    return SmokeRun(root, output_digests(root), (root / "submissions/submission.csv").read_bytes(), log_file.read_text())


def copy_of(run: SmokeRun, dst: Path) -> SmokeRun:
    """The smoke run's checkout copied to ``dst`` (a test that edits or kills in a checkout works here)."""
    shutil.copytree(run.root, dst, symlinks=True)
    return SmokeRun(dst, run.digests, run.submission, run.log)
