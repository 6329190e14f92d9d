"""The full pipeline as a Prefect flow: resolve the config into params.yaml, then run every stage of
dvc.yaml through DVC, one Prefect task per stage with the stage's name, then `dvc push`.

    python -m flows.pipeline --profile demo [--set head.max_epochs=3] [--submit] [--no-push]

Deployed as `statefarm-pipeline/full` (prefect.yaml): `prefect deployment run 'statefarm-pipeline/full'
--param profile=demo`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import Any

from prefect import flow, get_run_logger
from pydantic import ValidationError

from flows.console import CONSOLE, results_table, use_quiet_console
from flows.fanout import publish_fanout, run_fanned_out
from flows.lifetime import bind_ephemeral_server
from flows.params import Profile, RunParameters
from flows.submission import note_submission
from flows.tasks import (
    configure,
    dvc_slot,
    publish_metrics,
    push_cache,
    read_metrics,
    run_dvc_stage,  # noqa: F401  (re-exported: the task every stage runs)
    run_stages,
    stage_task,  # noqa: F401  (re-exported: tests check one task per stage, named after it)
    use_this_python,
)
from pipeline.artifacts import artifact_lines
from pipeline.config import PARAMS_FILE, ConfigError, load_params, overrides_to_delta, profile_path
from pipeline.console import set_verbose
from pipeline.env import set_offline_env
from pipeline.machine import check_machine
from pipeline.registry import PER_FOLD, STAGES


def check_runs_here(run: RunParameters) -> None:
    """``ConfigError`` naming the key when the config does not resolve, or when a stage this machine
    runs (every one, less the per-fold stages that fan out to workers) asks for a device it lacks."""
    cfg = run.config()
    check_machine(cfg, [stage for stage in STAGES if not (cfg.fanout.enabled and stage in PER_FOLD)])


def run_locked(run: RunParameters, root: str, force: Iterable[str] = ()) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """configure + every stage (+ the submission record), inside the caller's DVC slot. With
    ``fanout.enabled`` the per-fold stages run on the pool's workers (flows/fanout.py)."""
    configure(run.profile, run.config_overrides(), root)
    cfg = run.config()
    if cfg.fanout.enabled:
        ran, records = run_fanned_out(cfg, root, run.profile, run.config_overrides(), pull=run.pull)
        publish_fanout(records)
    else:
        ran = run_stages(cfg, root, force=force, pull=run.pull)
    metrics = read_metrics(root)
    if run.submit:
        note_submission(ran, metrics, run.profile, root)
    return ran, metrics


def run_pipeline(run: RunParameters, root: str, force: Iterable[str] = ()) -> dict[str, Any]:
    """The body shared by the pipeline and submit flows; returns reports/metrics.json."""
    set_offline_env()
    use_this_python()
    run.config()  # a bad override fails here, naming the key, before waiting for the DVC slot
    with dvc_slot(root):
        ran, metrics = run_locked(run, root, force)
        if run.push:
            push_cache(root)
    publish_metrics(metrics, ran, run.profile)
    logger = get_run_logger()
    logger.info("stages run: %s", [s for s, names in ran.items() if names] or "none (all up to date)")
    cfg = load_params(f"{root}/{PARAMS_FILE}")
    logger.info("artifacts:\n%s", "\n".join(artifact_lines(cfg)))
    table = results_table(root)
    logger.info("results:\n%s", table)
    CONSOLE.info("%s", table)
    return metrics


@flow(name="statefarm-pipeline", log_prints=True)
def pipeline_flow(
    profile: Profile = "demo",
    overrides: dict[str, Any] | None = None,
    submit: bool = False,
    push: bool = True,
    pull: bool = False,
    fanout_pool: str | None = None,
    root: str = ".",
) -> dict:
    """Every stage of dvc.yaml in order (each `dvc repro <stage> --single-item`); returns
    reports/metrics.json.

    Args:
        profile: configs/<profile>.yaml: demo (CPU, synthetic data), statefarm (GPU, real data), smoke (tests)
        overrides: config deltas over the profile, e.g. {"head.max_epochs": 3, "finetune.trainer.devices": 2}
        submit: upload the submission to Kaggle (sets submit.enabled=true); otherwise the submit stage is a dry run
        push: dvc push outputs (and the run cache) to the DVC remote after a successful run
        pull: restore stages that other workers already ran (and pushed) from the DVC remote instead of re-running them
        fanout_pool: run the per-fold stages as deployment runs on this work pool's workers (docs/deploy.md)
        root: the project checkout (the deployment's working directory)
    """
    run = RunParameters(profile=profile, overrides=overrides or {}, submit=submit, push=push, pull=pull,
                        fanout_pool=fanout_pool)
    check_runs_here(run)
    return run_pipeline(run, root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=pipeline_flow.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--submit", action="store_true", help="upload to Kaggle (submit.enabled=true)")
    parser.add_argument("--no-push", dest="push", action="store_false", help="skip dvc push after the run")
    parser.add_argument("--pull", action="store_true", help="restore stages other workers ran from the DVC remote")
    parser.add_argument("--fanout-pool", default=None, metavar="POOL",
                        help="run the per-fold stages on this Prefect work pool's workers")
    parser.add_argument("--root", default=".")
    parser.add_argument("--verbose", action="store_true",
                        help="Prefect's and DVC's log lines, every epoch and each stage's figures on the console")
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    # The profile, the overrides and this machine's devices are checked before Prefect starts, so that a
    # mistake is one message (Prefect would add its own tracebacks).
    try:
        profile_path(args.profile)  # names the known profiles
        run = RunParameters(profile=args.profile, overrides=overrides_to_delta(args.overrides), submit=args.submit,
                            push=args.push, pull=args.pull, fanout_pool=args.fanout_pool)
        check_runs_here(run)
    except (ConfigError, ValidationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    use_quiet_console()
    CONSOLE.info("profile %s: every dvc.yaml stage through DVC (only stale ones run)", args.profile)
    bind_ephemeral_server()  # a killed run leaves no Prefect server behind
    state = pipeline_flow(profile=run.profile, overrides=run.overrides or None, submit=run.submit, push=run.push,
                          pull=run.pull, fanout_pool=run.fanout_pool, root=args.root, return_state=True)
    if not state.is_completed():
        print(f"error: {state.message}", file=sys.stderr)  # names the failed stage (or the bad key)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
