"""End to end on a fresh copy of the repository with a real Prefect server (SQLite, loopback), the
real prefect.yaml deployed with `prefect deploy --all`, and a real process worker:

- two `statefarm-pipeline/full` runs at once both complete, their DVC sections never overlap (the
  checkout's DVC slot, a file lock), and the artifacts exist;
- the weekly retrain deployment has upcoming scheduled runs; a triggered retrain with nothing stale
  runs no stage;
- a broken input or a bad override fails with a message naming the stage (or the key);
- `dvc push` after the run fills the remote: a second clone `dvc pull`s and has nothing to reproduce.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkout import copy_project

from flows.local import api_url, prefect_cli, start_server, start_worker, stop, wait_for_api
from pipeline.io import file_sha256

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
POOL = "statefarm-pool"
TIMINGS: dict[str, float] = {}
STOP_S = 5  # throwaway test servers and workers: no 15 s graceful shutdown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 180) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def git(args: list[str], cwd: Path, env: dict[str, str]) -> str:
    return run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd, env)


def file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): file_sha256(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def server_env(base: Path, url: str, repo: Path) -> dict[str, str]:
    """The environment of a local Prefect server and its clients: its own PREFECT_HOME, quick worker
    polls, this interpreter's tools, and `flows`/`pipeline` imported from ``repo``."""
    env = dict(os.environ)
    env.update({
        "PREFECT_HOME": str(base / "prefect-home"),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick runs up quickly (default 10 s)
        "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        # `flows` and `pipeline` import from the copy, wherever this package is installed from.
        "PYTHONPATH": str(repo),
        "PWD": str(repo),  # prefect.yaml resolves the deployments' working directory from $PWD
    })
    env.pop("PREFECT_PROFILE", None)
    return env


class Stack:
    def __init__(self, base: Path, repo: Path, env: dict[str, str], url: str):
        self.base, self.repo, self.env, self.url = base, repo, env, url
        self.worker: subprocess.Popen | None = None

    def logs(self) -> str:
        """The end of the server's and the worker's output, for failure messages."""
        parts = []
        for name in ("server.log", "worker.log"):
            path = self.base / name
            if path.exists():
                parts.append(f"--- {name}\n" + path.read_text(errors="replace")[-4000:])
        return "\n".join(parts)

    def settings(self):
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

        return temporary_settings({PREFECT_API_URL: self.url, PREFECT_HOME: self.env["PREFECT_HOME"]})

    def client(self):
        from prefect.client.orchestration import get_client

        return get_client(sync_client=True)

    def start_worker(self) -> None:
        if self.worker is None:
            log = (self.base / "worker.log").open("w")
            self.worker = start_worker(POOL, self.env, cwd=self.base, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Server up, prefect.yaml deployed; the worker starts when a test first needs it."""
    base = tmp_path_factory.mktemp("deploy")
    repo = copy_project(base / "repo")
    port = free_port()
    url = api_url(port)
    env = server_env(base, url, repo)
    git(["init", "-q"], repo, env)
    git(["add", "-A"], repo, env)
    git(["commit", "-qm", "fresh checkout"], repo, env)

    start = time.monotonic()
    server = start_server(port, env, cwd=base, stdout=(base / "server.log").open("w"), stderr=subprocess.STDOUT)
    stack = Stack(base, repo, env, url)
    try:
        wait_for_api(url, timeout=120, proc=server)
        TIMINGS["server start (s)"] = time.monotonic() - start
        run([*prefect_cli(), "work-pool", "create", POOL, "--type", "process", "--overwrite"], repo, env)
        out = run([*prefect_cli(), "--no-prompt", "deploy", "--all"], repo, env)
        for name in ("statefarm-pipeline/full", "statefarm-retrain/weekly", "statefarm-submit/submit",
                     "statefarm-stages/stages"):
            assert f"Deployment '{name}' successfully created" in out, out
        yield stack
    finally:
        stop(stack.worker, timeout=STOP_S)
        stop(server, timeout=STOP_S)
        print("\ntimings:", {k: round(v, 1) for k, v in TIMINGS.items()})


def wait_final(stack: Stack, ids: list, timeout: float = 600) -> list:  # generous: CI machines are shared
    with stack.settings(), stack.client() as client:
        deadline = time.monotonic() + timeout
        while True:
            runs = [client.read_flow_run(i) for i in ids]
            if all(r.state and r.state.is_final() for r in runs):
                return runs
            assert time.monotonic() < deadline, \
                f"flow runs not done in {timeout}s: {[r.state_name for r in runs]}\n{stack.logs()}"
            time.sleep(0.5)


def dvc_window(stack: Stack, flow_run_id) -> tuple[dt.datetime, dt.datetime]:
    """First start and last end of the run's DVC work (configure, the stage tasks, dvc push)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with stack.settings(), stack.client() as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    assert tasks, "no task runs recorded"
    return min(t.start_time for t in tasks if t.start_time), max(t.end_time for t in tasks if t.end_time)


@pytest.fixture(scope="module")
def two_runs(stack):
    """Two smoke runs of the full deployment created at once, then one worker picks both up."""
    from prefect.deployments import run_deployment

    with stack.settings():
        created = time.monotonic()
        ids = [run_deployment("statefarm-pipeline/full", timeout=0, parameters={"profile": "smoke"}).id
               for _ in range(2)]
    stack.start_worker()
    runs = wait_final(stack, ids)
    TIMINGS["two concurrent smoke runs, create -> both done (s)"] = time.monotonic() - created
    return runs


def test_two_concurrent_runs_both_complete_one_dvc_section_at_a_time(stack, two_runs):
    assert [r.state_name for r in two_runs] == ["Completed", "Completed"], \
        f"{[r.state.message for r in two_runs]}\n{stack.logs()}"
    assert (stack.repo / "data/split.csv").exists() and (stack.repo / "reports/metrics.json").exists()
    (a_start, a_end), (b_start, b_end) = sorted(dvc_window(stack, r.id) for r in two_runs)
    assert a_end <= b_start, f"DVC sections overlap: {a_start}-{a_end} and {b_start}-{b_end}"
    # ...while the flow runs themselves were in flight at the same time (the second one waited).
    first, second = sorted(two_runs, key=lambda r: r.start_time)
    assert second.start_time < first.end_time, "the runs did not overlap; the test proves nothing"
    # The metrics table and the run summary are Prefect artifacts of each run.
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with stack.settings(), stack.client() as client:
        for r in two_runs:
            keys = {a.key for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[r.id])))}
            assert {"statefarm-metrics", "statefarm-run"} <= keys


def test_weekly_retrain_is_scheduled(stack):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
    )

    with stack.settings(), stack.client() as client:
        deployment = client.read_deployment_by_name("statefarm-retrain/weekly")
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 1"]
        assert deployment.schedules[0].schedule.timezone == "UTC"
        # prefect.yaml's pull step and working_dir point the worker at this checkout.
        step = deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
        assert Path(step["directory"]) == stack.repo
        assert Path(deployment.job_variables["working_dir"]) == stack.repo
        deadline = time.monotonic() + 60
        while True:  # the server's scheduler service fills in upcoming runs within seconds
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type={"any_": ["SCHEDULED"]})))
            if runs or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert runs, "no upcoming scheduled runs for statefarm-retrain/weekly"
    now = dt.datetime.now(dt.UTC)
    for r in runs:
        when = r.expected_start_time.astimezone(dt.UTC)
        assert when > now and when.weekday() == 0 and (when.hour, when.minute) == (3, 0)


def test_noop_retrain_runs_no_stage(stack, two_runs):
    lock = (stack.repo / "dvc.lock").read_text()
    outputs = {p: p.stat().st_mtime_ns for p in (stack.repo / "data").rglob("*") if p.is_file()}
    stack.start_worker()
    start = time.monotonic()
    out = run([*prefect_cli(), "deployment", "run", "statefarm-retrain/weekly", "--param", "profile=smoke",
               "--param", "submit=false", "--watch", "--watch-interval", "1"], stack.repo, stack.env, timeout=480)
    TIMINGS["no-op retrain, trigger -> done (s)"] = time.monotonic() - start
    assert "Completed" in out, out + stack.logs()
    assert (stack.repo / "dvc.lock").read_text() == lock
    assert {p: p.stat().st_mtime_ns for p in outputs} == outputs
    start = time.monotonic()
    run([sys.executable, "-m", "dvc", "repro"], stack.repo, stack.env)
    TIMINGS["dvc repro no-op, for comparison (s)"] = time.monotonic() - start


def test_dvc_push_then_pull_in_another_clone(stack, two_runs, tmp_path):
    a = stack.repo
    assert (a / ".dvc-remote").is_dir(), "the run did not dvc push to the default remote"
    git(["add", "-A"], a, stack.env)  # dvc.lock, params.yaml and the small metrics files, as a user commits them
    git(["commit", "-qm", "pipeline run"], a, stack.env)
    b = tmp_path / "clone-b"
    git(["clone", "-q", str(a), str(b)], tmp_path, stack.env)
    assert not (b / "data/split.csv").exists()
    dvc = [sys.executable, "-m", "dvc"]
    run([*dvc, "remote", "modify", "--local", "local", "url", str(a / ".dvc-remote")], b, stack.env)
    run([*dvc, "pull"], b, stack.env)
    assert "up to date" in run([*dvc, "status"], b, stack.env)
    assert "Running stage" not in run([*dvc, "repro"], b, stack.env)
    for out in ("data/raw", "data/hidden", "data/sample"):
        assert file_digests(b / out) == file_digests(a / out), out
    assert (b / "data/split.csv").read_bytes() == (a / "data/split.csv").read_bytes()


def test_failures_name_the_stage_or_the_key(stack, tmp_path):
    from prefect.logging.handlers import APILogHandler

    from flows.pipeline import pipeline_flow
    from pipeline.config import ConfigError

    repo = copy_project(tmp_path / "broken")
    git(["init", "-q"], repo, stack.env)
    with stack.settings():
        try:
            # Accepted by the schema, refused by the split stage: the run fails naming the stage and why.
            state = pipeline_flow(profile="smoke", overrides={"split.n_folds": 100}, push=False,
                                  root=str(repo), return_state=True)
            # Not in the schema: fails before any stage runs (or waits for the DVC slot), naming the key.
            with pytest.raises(ConfigError, match=r"(?s)configure: .*head\.no_such_key: unknown key"):
                pipeline_flow(profile="smoke", overrides={"head.no_such_key": 1}, root=str(repo))
        finally:
            APILogHandler().flush()  # send this process's run logs while the server is still up
    assert state.is_failed()
    assert "stage 'split' failed" in state.message
    assert re.search(r"error: split\.n_folds=100 needs at least that many groups", state.message), state.message
    assert not (repo / "data/split.csv").exists()


def test_stages_run_by_one_worker_are_restored_not_rerun_by_another(stack, tmp_path):
    """Scale-out through DVC: a worker runs a fold's head and an ensemble member on that fold (per-fold
    stages, the units that fan out) and pushes outputs + run cache to the shared remote; another
    checkout running with pull=true restores both instead of re-running them. The stages before them
    are persistent (a failed run keeps their last good outputs), so the run cache skips them: they
    re-run, deterministically, and the per-fold stages' inputs match."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from flows.stages import stages_flow

    remote = tmp_path / "shared-remote"
    worker, coordinator = (copy_project(tmp_path / name) for name in ("worker", "coordinator"))
    targets = ["ingest", "split", "sample", "pretrain", "features", "head@0", "member@0-0"]
    for repo in (worker, coordinator):
        git(["init", "-q"], repo, stack.env)
        run([sys.executable, "-m", "pipeline", "configure", "--profile", "smoke"], repo, stack.env)
        run([sys.executable, "-m", "dvc", "remote", "modify", "--local", "local", "url", str(remote)], repo, stack.env)
    with stack.settings():
        try:
            ran = stages_flow(targets=targets, pull=False, root=str(worker))
            assert ran["member@0-0"] == ["member@0-0"]
            state = stages_flow(targets=targets, pull=True, push=False, root=str(coordinator), return_state=True)
        finally:
            APILogHandler().flush()
        assert state.is_completed(), state.message
        with stack.client() as client:
            logs = [log.message for log in client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))]
    assert any(m.startswith("member@0-0: restored from the run cache") for m in logs), logs
    assert any(m.startswith("head@0: restored from the run cache") for m in logs), logs
    assert any(m.startswith("features: ran") for m in logs), logs  # persistent: the run cache skips it
    for rel in ("data/predictions/folds/member0/0/test.csv", "data/split.csv"):
        assert (coordinator / rel).read_bytes() == (worker / rel).read_bytes()

