"""Scale-out (``fanout.enabled``): the coordinator runs the stages before the per-fold ones itself,
then submits every per-fold stage item (``head@k``, ``finetune@k``, ``pseudo@k``, ``member@m-k``) as
its own run of the `statefarm-stages` deployment on ``fanout.work_pool``, concurrently, level by
level of the DVC graph (``head@k`` before the fine-tunes that start from it, ``finetune@k`` before
``pseudo@k``). Each worker runs its stage in its own checkout (same commit and params, checked
there) and pushes outputs and run cache to the shared DVC remote; the coordinator then restores the
level with `dvc repro --pull` instead of running it, and goes on. The engines do the work: Prefect
deployments, workers and task retries; DVC's remote and run cache.

A stage whose run fails, crashes, loses its worker (the Prefect server marks a worker offline after
three missed heartbeats) or exceeds ``fanout.stage_timeout_s`` (a hang guard) is submitted again
(``fanout.retries``, Prefect task retries), then run here (``fanout.run_locally_after_retries``) or
the run fails naming the stage and the worker. A worker whose checkout differs fails the run at once.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.checkout import checkout_state
from flows.stages import WORKER_ARTIFACT, read_worker_record
from flows.tasks import HOW_TEXT, push_cache, reproduce, run_stages, stage_task
from pipeline.config import Config, FanoutConfig
from pipeline.registry import PER_FOLD, STAGES

MISMATCH = "CheckoutMismatch"


class FanOutError(RuntimeError):
    """Scale-out could not start or a stage failed on its worker; names the stage and the worker."""


class RemoteStageFailed(FanOutError):
    def __init__(self, stage: str, worker: str, reason: str):
        self.stage, self.worker, self.reason = stage, worker, reason
        super().__init__(f"stage '{stage}' failed on worker {worker}: {reason}")

    def __reduce__(self):
        return (type(self), (self.stage, self.worker, self.reason))


# ---------------------------------------------------------------------------- what fans out


def partition_stages() -> tuple[list[str], list[str], list[str]]:
    """(before, per-fold, after) in dvc.yaml order."""
    names = list(STAGES)
    first = min(names.index(s) for s in PER_FOLD)
    last = max(names.index(s) for s in PER_FOLD)
    return names[:first], names[first:last + 1], names[last + 1:]


def fan_out_levels(root: str, groups: list[str]) -> list[list[str]]:
    """The items of the ``groups`` stages, grouped so that every item's per-fold upstream items sit
    in earlier levels (from DVC's own graph)."""
    import networkx as nx
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(root) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        items = {stage for stage in graph if stage.addressing.split("@")[0] in groups}
        level: dict[Any, int] = {}
        for stage in reversed(list(nx.topological_sort(graph.subgraph(items)))):
            upstream = [level[dep] for dep in graph.successors(stage) if dep in items]
            level[stage] = 1 + max(upstream) if upstream else 0
    levels: list[list[str]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for stage, depth in level.items():
        levels[depth].append(stage.addressing)
    return [sorted(names) for names in levels]


def stale(root: str, items: list[str]) -> list[str]:
    """The items `dvc status` reports as changed here: only those go to the workers."""
    from dvc.repo import Repo

    with contextlib.chdir(root), Repo(root) as repo:
        return [item for item in items if repo.status(targets=[item])]


def stages_deployment(fan: FanoutConfig) -> Any:
    """The deployment of ``fan.flow`` on ``fan.work_pool`` (its id), or a clear error."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, WorkPoolFilter, WorkPoolFilterName

    with get_client(sync_client=True) as client:
        found = client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[fan.flow])),
                                        work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[fan.work_pool])))
    if not found:
        raise FanOutError(f"fanout: no deployment of flow '{fan.flow}' on work pool '{fan.work_pool}'; register it "
                          "(`make deploy`) and start workers on the pool (scripts/start_worker.sh), or set fanout.enabled=false")
    return found[0].id


# ---------------------------------------------------------------------------- one stage on a worker


def worker_record(flow_run: Any) -> dict[str, Any]:
    """What the worker's run published (worker name, start, end), else what the API knows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]), key=ArtifactFilterKey(any_=[WORKER_ARTIFACT])))
    # one when the run started, one more when it finished
    records = [record for record in map(read_worker_record, (a.data for a in artifacts)) if record]
    if records:
        return max(records, key=lambda r: "end" in r)
    return {"worker": f"none (the run was never picked up; state {flow_run.state_name})"}


def cancel(flow_run_id: Any, why: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelled(message=why), force=True)


def worker_is_offline(pool: str, name: str) -> bool:
    """The Prefect server's view: a worker is offline after three heartbeat intervals without one. A
    name the pool does not know (a worker started without ``--name``) is never called offline."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus

    with get_client(sync_client=True) as client:
        workers = client.read_workers_for_work_pool(pool)
    return any(w.name == name and w.status == WorkerStatus.OFFLINE for w in workers)


@task(cache_policy=NO_CACHE)
def run_on_worker(stage: str, deployment_id: Any, parameters: dict[str, Any], fan: FanoutConfig) -> dict:
    """One deployment run of the stages flow for ``stage``, waited for until it ends, the worker that
    picked it up goes offline (it died with its machine), or ``fan.stage_timeout_s`` (a hang guard)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    flow_run = run_deployment(deployment_id, parameters=parameters, timeout=0, flow_run_name=stage,
                              tags=["statefarm-fanout"])
    deadline = time.monotonic() + fan.stage_timeout_s
    while True:
        with get_client(sync_client=True) as client:
            flow_run = client.read_flow_run(flow_run.id)
        state = flow_run.state
        if state is not None and state.is_final():
            break
        record = worker_record(flow_run)
        if "start" in record and worker_is_offline(fan.work_pool, record["worker"]):
            cancel(flow_run.id, "fanout: its worker went offline")
            raise RemoteStageFailed(stage, record["worker"], "the worker went offline (no heartbeat) while running "
                                    "it; the run was cancelled")
        if time.monotonic() > deadline:
            cancel(flow_run.id, "fanout: timed out")
            raise RemoteStageFailed(stage, record["worker"], f"no result within fanout.stage_timeout_s="
                                    f"{fan.stage_timeout_s:g}s; the run was cancelled")
        time.sleep(fan.poll_s)
    record = worker_record(flow_run)
    if not state.is_completed():
        raise RemoteStageFailed(stage, record["worker"], f"{state.name}: {state.message or ''}".strip())
    return {"stage": stage, "flow_run": str(flow_run.id), **record}


def retry_unless_mismatch(task, task_run, state) -> bool:
    """Another worker may succeed where one crashed; a checkout mismatch is a setup error."""
    return MISMATCH not in (state.message or "")


def dispatch(level: list[str], deployment_id: Any, common: dict[str, Any], fan: FanoutConfig
             ) -> tuple[dict[str, dict], dict[str, BaseException]]:
    """Every stage of ``level`` on the pool at once, each a run of the stages flow with ``common``
    parameters; (records of the done ones, errors of the others)."""
    futures = {
        stage: run_on_worker.with_options(task_run_name=f"{stage} on a worker", retries=fan.retries,
                                          retry_delay_seconds=0, retry_condition_fn=retry_unless_mismatch)
        .submit(stage, deployment_id, {**common, "targets": [stage]}, fan)
        for stage in level
    }
    done, failed = {}, {}
    for stage, future in futures.items():
        try:
            done[stage] = future.result()
        except Exception as err:  # noqa: BLE001  (each failure is handled below, by stage)
            failed[stage] = err
    return done, failed


# ---------------------------------------------------------------------------- the coordinator


@task(cache_policy=NO_CACHE)
def restore_level(stage: str, root: str) -> str:
    """`dvc repro <stage> --single-item --pull`: the worker's outputs from the remote's run cache."""
    names, how = reproduce(stage, root, pull=True)
    logger = get_run_logger()
    if how == "ran":
        logger.warning("%s: re-ran on the coordinator: the worker's run-cache entry did not match "
                       "(different inputs or nondeterministic upstream outputs)", stage)
    else:
        logger.info("%s: %s", stage, HOW_TEXT[how])
    return how


def run_fanned_out(cfg: Config, root: str, profile: str, overrides: dict[str, Any],
                   pull: bool = False) -> tuple[dict[str, list[str]], list[dict[str, Any]]]:
    """Every stage, the per-fold ones on the pool's workers; returns (stage -> items run or restored
    here, one record per fanned-out item: worker, times, how the coordinator got it)."""
    logger = get_run_logger()
    fan = cfg.fanout
    before, per_fold, after = partition_stages()
    deployment_id = stages_deployment(fan)
    ran = run_stages(cfg, root, before, pull=pull)
    push_cache(root)  # the workers pull the upstream outputs from the shared remote
    expect = checkout_state(root)
    records: list[dict[str, Any]] = []
    for level in fan_out_levels(root, per_fold):
        level = stale(root, level)
        if not level:
            continue
        lock = (Path(root) / "dvc.lock").read_text()
        start = time.monotonic()
        logger.info("fanning out %d stage(s) to pool '%s': %s", len(level), fan.work_pool, ", ".join(level))
        common = {"profile": profile, "overrides": overrides, "expect": expect, "dvc_lock": lock,
                  "pull": True, "push": True}
        done, failed = dispatch(level, deployment_id, common, fan)
        for stage, err in failed.items():
            if MISMATCH in str(err) or not fan.run_locally_after_retries:
                raise FanOutError(f"fanout: {err}") from None
            logger.warning("%s; after %d retr%s, running it on the coordinator", err, fan.retries,
                           "y" if fan.retries == 1 else "ies")
            stage_task(stage)(stage, root)
            done[stage] = {"stage": stage, "worker": "coordinator (fallback)", "error": str(err)}
        for stage in level:
            done[stage]["coordinator"] = restore_level.with_options(task_run_name=f"{stage} from the run cache")(stage, root)
            records.append(done[stage])
        push_cache(root)
        logger.info("level done in %.0fs", time.monotonic() - start)
    for stage in per_fold:
        ran[stage] = [r["stage"] for r in records if r["stage"].split("@")[0] == stage]
    ran.update(run_stages(cfg, root, after, pull=pull))
    return ran, records


def publish_fanout(records: list[dict[str, Any]]) -> None:
    from prefect.artifacts import create_table_artifact

    rows = [{"stage": r["stage"], "worker": r.get("worker", ""), "seconds": round(r["end"] - r["start"], 1)
             if "end" in r else "", "coordinator": r.get("coordinator", ""), "start": r.get("start", ""),
             "end": r.get("end", "")} for r in records]
    create_table_artifact(rows, key="statefarm-fanout", description="where each per-fold stage ran")
