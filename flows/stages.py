"""The worker side of scale-out: run some dvc.yaml stages on this worker's checkout and push outputs
and run cache to the shared DVC remote. The coordinator (``flows/fanout.py``, ``fanout.enabled``)
submits one run of this flow per per-fold stage; a run with ``pull=true`` elsewhere then restores
those stages from the remote's run cache instead of re-running them (DVC's `dvc repro --pull`).

Given the coordinator's ``expect`` (commit, uncommitted changes, params digest) the flow first makes
this checkout's params.yaml from the same profile and overrides and refuses to run when anything
differs, naming the worker. Given the coordinator's ``dvc_lock``, the stages upstream of the targets
are pulled from the remote (as the coordinator recorded them) rather than recomputed here.

Deployed as `statefarm-stages/stages` (prefect.yaml):
`prefect deployment run 'statefarm-stages/stages' --param targets='["member@1-0"]'`.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.checkout import check_same_checkout, worker_name
from flows.tasks import configure, dvc_slot, push_cache, stage_task, use_this_python
from pipeline.env import set_offline_env

WORKER_ARTIFACT = "statefarm-stage-worker"  # what ran where: the coordinator reads it back


def pull_upstream(root: str, dvc_lock: str, targets: list[str]) -> None:
    """Adopt the coordinator's dvc.lock and pull what the targets' upstream stages produced there."""
    from dvc.repo import Repo

    (Path(root) / "dvc.lock").write_text(dvc_lock)
    with contextlib.chdir(root), Repo(root) as repo:
        for target in targets:
            # with_deps: the target's upstream stages; those without a lock entry yet have nothing to pull
            repo.pull(targets=[target], with_deps=True, allow_missing=True)


def publish_worker_record(record: dict[str, Any]) -> None:
    """A markdown artifact holding the record as fenced JSON (readable in the UI; ``read_worker_record``)."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(f"```json\n{json.dumps(record)}\n```", key=WORKER_ARTIFACT,
                             description=f"stages run by worker {record['worker']}")


def read_worker_record(data: Any) -> dict[str, Any] | None:
    """The record ``publish_worker_record`` wrote, from the artifact's data (None if it is not one)."""
    try:
        return json.loads(str(data).strip().removeprefix("```json").removesuffix("```"))
    except ValueError:
        return None


@flow(name="statefarm-stages", log_prints=True)
def stages_flow(targets: list[str], pull: bool = True, push: bool = True, root: str = ".",
                profile: str | None = None, overrides: dict[str, Any] | None = None,
                expect: dict[str, Any] | None = None, dvc_lock: str | None = None) -> dict[str, list[str]]:
    """`dvc repro <target> --single-item` for each target, in the given order, then dvc push.

    Args:
        targets: dvc.yaml stage names, e.g. ["member@0-1"] (member 0 on fold 1) or ["ingest", "split"]
        pull: first restore what other workers already pushed (deps and run cache) from the DVC remote
        push: push outputs and run cache to the DVC remote afterwards
        root: the project checkout (a worker's own, from its pull step)
        profile: with overrides, write this checkout's params.yaml first (the coordinator sends its own)
        overrides: config deltas over the profile
        expect: the coordinator's checkout (commit, uncommitted, params): refuse to run if this one differs
        dvc_lock: the coordinator's dvc.lock: upstream outputs are pulled as it recorded them
    """
    set_offline_env()
    use_this_python()
    logger = get_run_logger()
    worker = worker_name()
    record = {"worker": worker, "targets": targets, "start": time.time()}
    publish_worker_record(record)  # first thing: a run that dies later is still traced to this worker
    with dvc_slot(root):
        if profile is not None:
            configure(profile, overrides, root)
        if expect is not None:
            check_same_checkout(root, expect, worker)
        if dvc_lock is not None:
            pull_upstream(root, dvc_lock, targets)
        ran = {target: stage_task(target)(target, root, pull=pull) for target in targets}
        if push:
            push_cache(root)
    logger.info("worker %s ran: %s", worker, [t for t, names in ran.items() if names] or "none (all up to date)")
    publish_worker_record({**record, "ran": [t for t, n in ran.items() if n], "end": time.time()})
    return ran
