"""Scheduled retraining: `dvc repro` every stage (only the stale ones run: new data, code or params),
then submit only when the validation log loss improved on the last submission, compared like with like
(the same stage, validation mode and labelled rows; flows/submission.py).

The headline figure is the `valid_logloss` of the last stage in DAG order that reports one
(reports/metrics.json); the last submitted score lives in reports/last_submission.json.
Deployed as `statefarm-retrain/weekly` (prefect.yaml, cron `0 3 * * 1` UTC).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.params import Profile, RunParameters
from flows.pipeline import run_locked
from flows.submission import read_last_submission, should_submit
from flows.tasks import dvc_slot, publish_metrics, publish_submission, push_cache, use_this_python
from pipeline.env import set_offline_env


def kaggle_credentials() -> bool:
    from pipeline.kaggle_client import credentials_found as has_kaggle_credentials

    return has_kaggle_credentials()


@flow(name="statefarm-retrain", log_prints=True)
def retrain_flow(
    profile: Profile = "statefarm",
    overrides: dict[str, Any] | None = None,
    submit: bool = True,
    min_improvement: float = 0.0,
    push: bool = True,
    root: str = ".",
) -> dict:
    """Re-run the stale stages; submit when the validation log loss beats the last submission.

    Args:
        profile: configs/<profile>.yaml to retrain with
        overrides: config deltas over the profile
        submit: allow an upload when the score improved (false: only retrain and report)
        min_improvement: how much lower the validation log loss must be than the last submission's
        push: dvc push to the DVC remote afterwards
        root: the project checkout (the deployment's working directory)
    """
    set_offline_env()
    use_this_python()
    logger = get_run_logger()
    run = RunParameters(profile=profile, overrides=overrides or {}, submit=False, push=push)
    run.config()  # a bad override fails here, naming the key
    submitted = False
    with dvc_slot(root):
        ran, metrics = run_locked(run, root)
        improved, reason = should_submit(metrics, read_last_submission(root), min_improvement)
        logger.info(reason)
        if not (submit and improved):
            publish_submission(f"submit=false, not submitting ({reason})" if improved else reason)
        elif not kaggle_credentials():
            text = f"{reason}; but this worker has no Kaggle credentials: not submitting"
            logger.warning(text)
            publish_submission(text)
        else:
            upload = run.model_copy(update={"submit": True})
            again, metrics = run_locked(upload, root)
            ran = {stage: ran.get(stage, []) + again.get(stage, []) for stage in ran}
            submitted = bool(again.get("submit"))
        if run.push:
            push_cache(root)
    publish_metrics(metrics, ran, run.profile)
    return {"stages_run": [s for s, names in ran.items() if names], "submitted": submitted, "reason": reason}
