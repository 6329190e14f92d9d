"""Submit the current results to Kaggle: the pipeline with ``submit.enabled=true``. Stages that are up
to date are skipped, so this normally runs only the `submit` stage (through DVC); a stale upstream
stage is re-run first, so a submission never comes from outdated artifacts.

Deployed as `statefarm-submit/submit` (prefect.yaml).
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.params import Profile, RunParameters
from flows.pipeline import run_pipeline
from flows.submission import SUBMIT_STAGE


@flow(name="statefarm-submit", log_prints=True)
def submit_flow(
    profile: Profile = "statefarm",
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    push: bool = True,
    root: str = ".",
) -> dict:
    """Run the `submit` stage through DVC with uploads enabled (refused for synthetic data).

    Args:
        profile: configs/<profile>.yaml the submission was computed with
        overrides: config deltas over the profile (must match the run that produced the submission)
        force: upload again even if this exact submission was already made
        push: dvc push to the DVC remote afterwards
        root: the project checkout (the deployment's working directory)
    """
    run = RunParameters(profile=profile, overrides=overrides or {}, submit=True, push=push)
    return run_pipeline(run, root, force=[SUBMIT_STAGE] if force else ())
