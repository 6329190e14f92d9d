"""The full pipeline as a Prefect flow: resolve the config into params.yaml, then run every stage of
dvc.yaml through DVC, one Prefect task per stage with the stage's name.

    python -m flows.pipeline --profile demo [--set head.max_epochs=3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.artifacts import artifact_lines
from pipeline.config import PARAMS_FILE, load_params, load_profile, overrides_to_delta, write_params
from pipeline.env import set_offline_env
from pipeline.io import read_json
from pipeline.stages import STAGES


def use_this_python() -> None:
    """DVC stage commands say `python`: make that the interpreter running this flow."""
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


@task(name="configure", cache_policy=NO_CACHE)
def configure(profile: str, overrides: dict[str, Any] | None, root: str) -> str:
    cfg = load_profile(profile, overrides)
    return str(write_params(cfg, Path(root) / PARAMS_FILE))


@task(cache_policy=NO_CACHE)
def run_dvc_stage(stage: str, root: str) -> list[str]:
    """`dvc repro <stage> --single-item`: runs the stage only if its deps, params or code changed."""
    from dvc.repo import Repo

    # DVC resolves stage paths against the working directory, not only the repo root.
    with contextlib.chdir(root), Repo(root) as repo:
        ran = repo.reproduce(targets=[stage], single_item=True)
    names = [s.addressing for s in ran]
    get_run_logger().info("%s: %s", stage, "ran" if names else "up to date, skipped")
    return names


def stage_task(stage: str):
    return run_dvc_stage.with_options(name=stage, task_run_name=stage)


@flow(name="statefarm-pipeline", log_prints=True)
def pipeline_flow(profile: str = "demo", overrides: dict[str, Any] | None = None, root: str = ".") -> dict:
    """Every stage of dvc.yaml in order; returns reports/metrics.json."""
    set_offline_env()
    use_this_python()
    params = configure(profile, overrides, root)
    ran = {stage: stage_task(stage)(stage, root) for stage in STAGES}
    cfg = load_params(params)
    print(f"stages run: {[s for s, names in ran.items() if names] or 'none (all up to date)'}")
    print("artifacts:\n" + "\n".join(artifact_lines(cfg)))
    return read_json(cfg.paths.path("metrics"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=pipeline_flow.__doc__)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    overrides = overrides_to_delta(args.overrides) or None
    pipeline_flow(profile=args.profile, overrides=overrides, root=args.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
