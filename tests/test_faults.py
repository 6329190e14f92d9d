"""Fault injection: kill the `features` stage, the `finetune` stage, `dvc repro` and the Prefect flow at
seeded random points of their work, then check what the README promises: the next run succeeds, its
outputs equal an uninterrupted run's byte for byte (features, every prediction file, the submission),
no temp folder and no process of the run is left, and no previous good output is lost (kept in place,
or, for an output DVC deletes before a stage runs, restorable from DVC's cache by `dvc checkout`).

The uninterrupted reference is the session's smoke run (conftest.smoke_run); the kills happen in a copy of its checkout. Each kill is its own
test item, so pytest's count is the report: kills made, kills passed."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import SmokeRun, copy_of, output_digests
from test_flow import sh, tool_env

pytestmark = [pytest.mark.slow, pytest.mark.faults]

SEED = 14
TEMP_SUFFIXES = (".tmp", ".old", ".scratch")
KILL_ATTEMPTS = 4
HANG_GUARD_S = 600  # waits that only guard against a hang: a loaded CI machine is slow, never this slow


@pytest.fixture(scope="module")
def project(smoke_run, tmp_path_factory) -> SmokeRun:
    """A copy of the uninterrupted smoke run's checkout; each test leaves it as it found it (checked)."""
    return copy_of(smoke_run, tmp_path_factory.mktemp("faults") / "repo")


def dvc(root: Path, *args: str) -> str:
    return sh([sys.executable, "-m", "dvc", *args], root)


def stage_seconds(root: Path, item: str) -> float:
    return float(json.loads((root / "reports/stages" / f"{item}.json").read_text())["seconds"])


def live_processes_in(root: Path) -> list[psutil.Process]:
    """Processes (zombies aside) working in the checkout: stage commands, DVC, the flow."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.status() != psutil.STATUS_ZOMBIE and process.pid != os.getpid() and \
                    Path(process.cwd()).is_relative_to(root):
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def temp_leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for folder in ("data", "models", "reports", "submissions")
                  for p in (root / folder).rglob(".*") if p.name.endswith(TEMP_SUFFIXES))


def kill_while(command: list[str], root: Path, stage: str, delay: float, victim: str, env: dict | None = None,
               prepare: Callable[[], None] = lambda: None) -> None:
    """Run ``command`` in ``root``; once the process of ``stage`` (``python -m pipeline <stage>``) has
    worked ``delay`` seconds, SIGKILL it (victim ``stage``) or ``command`` itself (victim ``parent``).
    Then the run has failed and, within seconds, nothing of it runs on.

    ``delay`` is a fraction of the reference run's wall time, which another machine or another load can
    beat: when the stage ends first (the command then ran through, to the same outputs), the kill is
    tried again at half the delay (``prepare`` runs before each try), so that it lands in the stage's work."""
    for _ in range(KILL_ATTEMPTS):
        prepare()
        if kill_once(command, root, stage, delay, victim, env):
            return
        delay /= 2
    pytest.fail(f"{stage} ended before its kill {KILL_ATTEMPTS} times, the last after {delay * 2:.2f}s")


def kill_once(command: list[str], root: Path, stage: str, delay: float, victim: str, env: dict | None) -> bool:
    """One try of :func:`kill_while`; False when the stage ended before the kill was due."""
    parent = subprocess.Popen(command, cwd=root, env=env or tool_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        worker = wait_for_stage(parent, stage)
        time.sleep(delay)
        try:
            if not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE:
                parent.wait(timeout=HANG_GUARD_S)
                return False
            (worker if victim == "stage" else psutil.Process(parent.pid)).send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            parent.wait(timeout=HANG_GUARD_S)
            return False
        assert parent.wait(timeout=HANG_GUARD_S) != 0
        # Generous, only against a hang: the kill's process tree ends within seconds on an idle machine.
        deadline = time.monotonic() + 60
        while (left := live_processes_in(root)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"left running after the kill: {[' '.join(p.cmdline()[:6]) for p in left]}"
        return True
    finally:
        with_children_killed(parent)


def wait_for_stage(parent: subprocess.Popen, stage: str, timeout: float = HANG_GUARD_S) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and parent.poll() is None:
        for child in psutil.Process(parent.pid).children(recursive=True):
            try:
                if f"pipeline {stage}" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.05)
    pytest.fail(f"stage {stage} never started (exit {parent.poll()})")


def with_children_killed(parent: subprocess.Popen) -> None:
    if parent.poll() is None:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def forget_checkpoints(root: Path) -> None:
    """A finished fit is reused from its checkpoint; without them the killed run really trains."""
    shutil.rmtree(root / ".checkpoints", ignore_errors=True)


def assert_clean_and_equal(project: SmokeRun) -> None:
    assert temp_leftovers(project.root) == []
    assert output_digests(project.root) == project.digests
    # Every stage is up to date but the two that read the whole models folder, where a re-run training
    # writes new timings and TensorBoard events beside the same weights: the report (it shows them) and
    # submit (its code-competition export packs the fold models). Their inputs that carry predictions
    # are unchanged: submit's only changed dependency is that folder.
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project.root, env=tool_env(),
                            capture_output=True, text=True, check=True).stdout
    stale = json.loads(status or "{}")
    assert set(stale) <= {"report", "submit"}, stale
    assert all(change == {"changed deps": {"models": "modified"}} for change in stale.get("submit", [])), stale


def delay_for(project: SmokeRun, item: str, case: int) -> float:
    """A seeded point in the first 70% of the item's uninterrupted run time (so the kill lands in its work)."""
    return random.Random(f"{SEED}-{item}-{case}").uniform(0.15, 0.7) * stage_seconds(project.root, item)


@pytest.mark.parametrize("case", [0, 1])
def test_killed_features_stage(project, case):
    root = project.root
    kill_while([sys.executable, "-m", "dvc", "repro", "-f", "-s", "features"], root, "features",
               delay_for(project, "features", case), victim="stage")
    assert output_digests(root) == project.digests  # persistent, written chunk by chunk: nothing lost
    dvc(root, "repro", "-f", "-s", "features")  # reuses the chunks it can verify, computes the rest: the same bytes
    assert_clean_and_equal(project)


@pytest.mark.parametrize("case", [0, 1])
def test_killed_finetune_stage(project, case):
    root = project.root
    kill_while([sys.executable, "-m", "dvc", "repro", "-f", "-s", "finetune@0"], root, "finetune",
               delay_for(project, "finetune@0", case), victim="stage", prepare=lambda: forget_checkpoints(root))
    # DVC deleted the outputs before the run (its cache still has them); the killed run left some of
    # its own (TensorBoard events, perhaps its figures file), which only --force replaces.
    dvc(root, "checkout", "--force", "finetune@0")
    assert output_digests(root) == project.digests
    dvc(root, "repro", "-f", "-s", "--no-run-cache", "finetune@0")  # resumes from the killed run's last epoch
    assert_clean_and_equal(project)


@pytest.mark.parametrize("item", ["head@0", "pseudo@0", "member@0-0"])
def test_killed_training_stage_resumes(project, item):
    """Every training stage, killed at a seeded point of its work, resumes on the next run from its last
    checkpoint (never from scratch, when one was written) and ends where the uninterrupted run did."""
    root = project.root
    kill_while([sys.executable, "-m", "dvc", "repro", "-f", "-s", item], root, item.split("@")[0],
               delay_for(project, item, 0), victim="stage", prepare=lambda: forget_checkpoints(root))
    dvc(root, "checkout", "--force", item)
    assert output_digests(root) == project.digests
    dvc(root, "repro", "-f", "-s", "--no-run-cache", item)
    assert_clean_and_equal(project)


@pytest.mark.parametrize("case", [0, 1])
def test_killed_dvc_repro(project, case):
    root = project.root
    items = ["head@1", "finetune@1", "pseudo@1"]
    total = sum(stage_seconds(root, item) for item in items)
    delay = random.Random(f"{SEED}-repro-{case}").uniform(0.1, 0.8) * total
    # DVC is the victim: the stage it runs must end with it (no second writer left behind).
    stage = "head" if delay < stage_seconds(root, "head@1") else "finetune"
    delay = delay if stage == "head" else delay - stage_seconds(root, "head@1")
    kill_while([sys.executable, "-m", "dvc", "repro", "-f", "-s", *items], root, stage, delay, victim="parent",
               prepare=lambda: forget_checkpoints(root))
    dvc(root, "repro", "--no-run-cache")  # whatever the kill left stale runs again
    assert_clean_and_equal(project)


def test_killed_prefect_flow(project, tmp_path):
    root = project.root

    def pseudo_must_run() -> None:
        """So that the flow re-runs pseudo instead of restoring it: no checkpoints, no run cache, no
        record in dvc.lock."""
        forget_checkpoints(root)
        shutil.rmtree(root / ".dvc/cache/runs", ignore_errors=True)
        lock = yaml.safe_load((root / "dvc.lock").read_text())
        for fold in (0, 1):
            lock["stages"].pop(f"pseudo@{fold}", None)
        (root / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))

    env = {**tool_env(), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    flow = [sys.executable, "-m", "flows.pipeline", "--profile", "smoke", "--no-push", "--root", str(root)]
    delay = random.Random(f"{SEED}-flow").uniform(0.15, 0.7) * stage_seconds(root, "pseudo@0")
    kill_while(flow, root, "pseudo", delay, victim="parent", env=env, prepare=pseudo_must_run)
    done = subprocess.run(flow, cwd=root, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S * 2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert_clean_and_equal(project)
