"""Scale-out end to end on this machine: a real Prefect server, two process workers started by
scripts/start_worker.sh (each its own clone at the coordinator's commit, its own DVC limit name),
a shared local DVC remote, and a coordinator checkout running the pipeline flow with
``fanout_pool``: the per-fold stages (smoke: 2 heads, 2 fine-tunes, 4 members, 2 pseudo) run on the
workers, one of which is killed mid-stage, and the coordinator restores them from the remote's run cache.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from checkout import copy_project
from test_deployments import POOL, STOP_S, free_port, git, run, server_env

from flows.local import api_url, prefect_cli, start_server, stop, wait_for_api

ROOT = Path(__file__).resolve().parent.parent
WALL: dict[str, float] = {}
# A worker is offline after three heartbeats missed: 30 s here; short enough for a test, long enough that a
# loaded machine never starves a live worker's heartbeat that long.
HEARTBEAT_S = 10


class Cluster:
    def __init__(self, base: Path, env: dict[str, str], url: str, origin: Path, remote: Path):
        self.base, self.env, self.url, self.origin, self.remote = base, env, url, origin, remote
        self.workers: dict[str, subprocess.Popen] = {}

    def settings(self):
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

        return temporary_settings({PREFECT_API_URL: self.url, PREFECT_HOME: self.env["PREFECT_HOME"]})

    def clone(self, name: str) -> Path:
        path = self.base / name
        git(["clone", "-q", str(self.origin), str(path)], self.base, self.env)
        run([sys.executable, "-m", "dvc", "remote", "modify", "--local", "local", "url", str(self.remote)], path, self.env)
        return path

    def start_worker(self, name: str) -> None:
        commit = git(["rev-parse", "HEAD"], self.origin, self.env).strip()
        log = (self.base / f"{name}.log").open("w")
        self.workers[name] = subprocess.Popen(
            ["bash", str(ROOT / "scripts/start_worker.sh"), "--repo", str(self.origin), "--commit", commit,
             "--dir", str(self.base / name), "--remote", str(self.remote), "--pool", POOL, "--name", name,
             "--venv", str(Path(sys.executable).parent.parent)],
            env={**self.env, "PREFECT_WORKER_HEARTBEAT_SECONDS": str(HEARTBEAT_S)}, cwd=self.base, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, name: str) -> str:
        return (self.base / f"{name}.log").read_text(errors="replace")

    def fanout_records(self, flow_run_id) -> list[dict]:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["statefarm-fanout"])))
        mine = [a for a in artifacts if a.flow_run_id == flow_run_id]
        assert mine, "no statefarm-fanout artifact for the coordinator's run"
        data = mine[0].data
        return json.loads(data) if isinstance(data, str) else data


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("fanout")
    origin = copy_project(base / "origin")
    port = free_port()
    url = api_url(port)
    env = server_env(base, url, origin)
    git(["init", "-q"], origin, env)
    git(["add", "-A"], origin, env)
    git(["commit", "-qm", "coordinator's commit"], origin, env)
    cluster = Cluster(base, env, url, origin, base / "shared-remote")
    server = start_server(port, env, cwd=base, stdout=(base / "server.log").open("w"), stderr=subprocess.STDOUT)
    try:
        wait_for_api(url, timeout=120, proc=server)
        run([*prefect_cli(), "work-pool", "create", POOL, "--type", "process", "--overwrite"], origin, env)
        out = run([*prefect_cli(), "--no-prompt", "deploy", "--name", "stages"], origin, env)
        assert "Deployment 'statefarm-stages/stages' successfully created" in out, out
        for name in ("w1", "w2"):
            cluster.start_worker(name)
        yield cluster
    finally:
        for proc in cluster.workers.values():
            stop(proc, timeout=STOP_S)
        stop(server, timeout=STOP_S)
        print("\nwall times (s):", {k: round(v, 1) for k, v in WALL.items()})


def run_coordinator(cluster: Cluster, root: Path, **params):
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import pipeline_flow

    with cluster.settings():
        start = time.monotonic()
        try:
            state = pipeline_flow(profile="smoke", root=str(root), return_state=True, **params)
        finally:
            APILogHandler().flush()
        return state, time.monotonic() - start


def overlapping(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def run_started_by(cluster: Cluster, worker: str, since: float, stage_prefix: str = "", timeout: float = 600):
    """The first flow run ``worker`` started after ``since`` for a stage named ``stage_prefix``... (the
    stages flow records its worker and targets first thing)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.stages import WORKER_ARTIFACT, read_worker_record

    start = time.monotonic()
    with cluster.settings(), get_client(sync_client=True) as client:
        while time.monotonic() - start < timeout:
            for artifact in client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[WORKER_ARTIFACT]))):
                record = read_worker_record(artifact.data)
                if (record and record["worker"] == worker and record["start"] > since
                        and all(t.startswith(stage_prefix) for t in record["targets"])):
                    return client.read_flow_run(artifact.flow_run_id)
            time.sleep(0.5)
    raise AssertionError(f"{worker} started no {stage_prefix or 'stage'} run:\n{cluster.log(worker)[-2000:]}")


def wait_for_stage_process(checkout: Path, command: str, timeout: float = 600) -> None:
    """Until a process running ``command`` works in ``checkout`` (the timeout only guards a hang)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if command in " ".join(process.cmdline()) and Path(process.cwd()).is_relative_to(checkout):
                    return
        time.sleep(0.1)
    raise AssertionError(f"no '{command}' process in {checkout} within {timeout}s")


def kill_worker_mid_stage(cluster: Cluster, worker: str, since: float, stage_prefix: str) -> None:
    """SIGKILL the worker and the flow run it started, as when its machine dies: the run stays Running.
    The kill comes once the stage's own process runs in the worker's checkout (mid-stage, on any machine)."""
    flow_run = run_started_by(cluster, worker, since, stage_prefix)
    wait_for_stage_process(cluster.base / worker, f"pipeline {stage_prefix.rstrip('@')}")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(cluster.workers[worker].pid, signal.SIGKILL)
    pid = int(str(flow_run.infrastructure_pid or "0").split(":")[-1])
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if pid:
            os.killpg(os.getpgid(pid), signal.SIGKILL)  # the worker starts each run in its own session
    cluster.workers[worker].wait(10)


@pytest.mark.slow
def test_fanned_out_run_survives_a_killed_worker_and_equals_the_single_machine_run(cluster, smoke_run):
    """Both workers run the per-fold stages, level by level, at the same time; w2 dies while running a
    pseudo stage: that run never finishes; once the server sees w2 offline (three missed heartbeats) the
    coordinator cancels it and submits it again (a Prefect task retry), w1 (or, after the retries, the coordinator) runs it. The
    coordinator restores every stage from the run cache, and the submission is the single machine's."""
    import threading

    coordinator = cluster.clone("coordinator")
    killer = threading.Thread(target=kill_worker_mid_stage, args=(cluster, "w2", time.time(), "pseudo@"), daemon=True)
    killer.start()
    # Params the stages do not read. The timeout only guards a hang: the dead worker is found by its heartbeat.
    overrides = {"fanout.stage_timeout_s": 1800, "fanout.retries": 1}
    state, WALL["fanned out, w2 killed"] = run_coordinator(cluster, coordinator, fanout_pool=POOL, overrides=overrides)
    killer.join(timeout=5)
    assert cluster.workers["w2"].poll() is not None, "w2 was never killed"
    assert state.is_completed(), state.message + "\n" + cluster.log("w1")[-3000:] + cluster.log("w2")[-3000:]
    with cluster.settings():
        records = cluster.fanout_records(state.state_details.flow_run_id)

    stages = {r["stage"] for r in records}
    assert stages == {"head@0", "head@1", "finetune@0", "finetune@1", "pseudo@0", "pseudo@1",
                      "member@0-0", "member@0-1", "member@1-0", "member@1-1"}
    # every per-fold stage ran on a worker (or, retried, on the coordinator) and was restored from the run cache
    assert {r["worker"] for r in records} >= {"w1", "w2"}, records
    assert {r["worker"] for r in records if r["stage"].startswith("pseudo@")} <= {"w1", "coordinator (fallback)"}, records
    assert all(r["coordinator"] == "restored" for r in records if r["worker"] != "coordinator (fallback)"), records
    # the two workers worked at the same time
    timed = [r for r in records if "start" in r]
    assert any(overlapping(a, b) for a in timed for b in timed if a["worker"] != b["worker"]), timed

    # The single-machine run of the same checkout and profile: the session's uninterrupted smoke run.
    fanned = pd.read_csv(coordinator / "submissions/submission.csv")
    alone = pd.read_csv(io.BytesIO(smoke_run.submission))
    assert list(fanned.columns) == list(alone.columns) and fanned["img"].tolist() == alone["img"].tolist()
    assert (fanned.drop(columns="img") - alone.drop(columns="img")).abs().to_numpy().max() <= 1e-6


@pytest.mark.slow
def test_a_worker_at_another_commit_is_refused(cluster):
    coordinator = cluster.base / "coordinator"
    w1 = cluster.base / "w1"
    git(["commit", "-q", "--allow-empty", "-m", "a local commit on the worker"], w1, cluster.env)
    try:
        state, _ = run_coordinator(cluster, coordinator, fanout_pool=POOL, overrides={"pseudo.max_epochs": 3})
    finally:
        git(["reset", "-q", "--hard", "HEAD~1"], w1, cluster.env)
    assert state.is_failed()
    assert "worker w1 refuses to run" in state.message and "commit" in state.message, state.message
    assert "stage 'pseudo@" in state.message


# ---------------------------------------------------------------------------- units


def test_per_fold_stages_fan_out_in_dependency_levels():
    """From DVC's graph: heads first, then what starts from a head (fine-tunes, members), then pseudo."""
    from flows.fanout import fan_out_levels, partition_stages

    before, per_fold, after = partition_stages()
    assert before[-1] == "features" and after[0] == "oof"
    levels = fan_out_levels(str(ROOT), per_fold)  # the committed params.yaml: demo, 3 folds, members [0, 1]
    assert levels[0] == ["head@0", "head@1", "head@2"]
    assert set(levels[1]) == {f"finetune@{k}" for k in range(3)} | {f"member@{m}-{k}" for m in (0, 1) for k in range(3)}
    assert levels[2] == ["pseudo@0", "pseudo@1", "pseudo@2"]


def test_the_gpu_pool_template_keeps_prefects_kubernetes_template_and_adds_a_gpu_limit():
    import prefect
    from prefect.utilities.templating import find_placeholders

    views = Path(prefect.__file__).parent / "server/api/collections_data/views/aggregate-worker-metadata.json"
    default = json.loads(views.read_text())["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]
    ours = json.loads((ROOT / "deploy/k8s-gpu-base-job-template.json").read_text())
    assert set(ours) == set(default) == {"job_configuration", "variables"}
    assert set(default["job_configuration"]) <= set(ours["job_configuration"])
    assert set(default["variables"]["properties"]) <= set(ours["variables"]["properties"])
    # every placeholder the job configuration uses is a declared variable
    used = {p.name for p in find_placeholders(ours["job_configuration"])}
    assert used <= set(ours["variables"]["properties"]), used - set(ours["variables"]["properties"])
    container = ours["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert ours["variables"]["properties"]["gpus"]["type"] == "integer"
