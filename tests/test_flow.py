"""End to end on a copy of the repository: `dvc repro` from a fresh checkout runs every stage, a
second one runs none, and the Prefect flow (real local server) drives the same stages through DVC."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def project_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def sh(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh checkout of the working tree (what CI and a new user start from)."""
    dst = tmp_path_factory.mktemp("clone")
    for rel in project_files():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst / rel)
    sh(["git", "init", "-q"], dst)
    sh([sys.executable, "-m", "pipeline", "configure", "--profile", "smoke"], dst)
    return dst


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_nothing(clone):
    first = sh([sys.executable, "-m", "dvc", "repro"], clone)
    for stage in ("ingest", "split", "sample", "report"):
        assert f"Running stage '{stage}'" in first
    assert (clone / "data/split.csv").exists() and (clone / "reports/metrics.json").exists()
    second = sh([sys.executable, "-m", "dvc", "repro"], clone)
    assert "Running stage" not in second


@pytest.mark.slow
def test_prefect_flow_runs_the_stages_through_dvc(clone, tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline_flow

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    with prefect_test_harness(server_startup_timeout=120):
        metrics = pipeline_flow(profile="smoke", overrides={"sample.n_train": 25}, root=str(clone))
    assert metrics["sample"]["n_train"] == 25  # the override reached the stage through params.yaml
    assert set(metrics) >= {"ingest", "split", "sample"}
