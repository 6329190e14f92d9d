"""Fan-out: run a few dvc.yaml stages on this worker's checkout (e.g. one ensemble member), with the
checkout's params.yaml as it is, and push outputs and run cache to the shared DVC remote. A full
run with ``pull=true`` elsewhere then restores those stages from the remote's run cache instead of
re-running them (DVC's `dvc repro --pull`).

Deployed as `statefarm-stages/stages` (prefect.yaml):
`prefect deployment run 'statefarm-stages/stages' --param targets='["member@1-0"]'`.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.tasks import dvc_slot, push_cache, stage_task, use_this_python
from pipeline.env import set_offline_env


@flow(name="statefarm-stages", log_prints=True)
def stages_flow(targets: list[str], pull: bool = True, push: bool = True, root: str = ".") -> dict[str, list[str]]:
    """`dvc repro <target> --single-item` for each target, in the given order, then dvc push.

    Args:
        targets: dvc.yaml stage names, e.g. ["member@0-1"] (member 0 on fold 1) or ["ingest", "split"]
        pull: first restore what other workers already pushed (deps and run cache) from the DVC remote
        push: push outputs and run cache to the DVC remote afterwards
        root: the project checkout (the deployment's working directory)
    """
    set_offline_env()
    use_this_python()
    with dvc_slot():
        ran = {target: stage_task(target)(target, root, pull=pull) for target in targets}
        if push:
            push_cache(root)
    get_run_logger().info("ran: %s", [t for t, names in ran.items() if names] or "none (all up to date)")
    return ran
