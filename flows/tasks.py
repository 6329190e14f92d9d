"""The Prefect tasks and wiring the flows share: resolve the config, run one DVC stage, hold the
repository's DVC slot, push the cache, publish artifacts. No computation happens here: every stage
runs through DVC (`dvc repro <stage> --single-item`), so an orchestrated run equals `dvc repro`."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.console import CONSOLE, stage_line
from pipeline.config import PARAMS_FILE, Config, ConfigError, load_params, load_profile, write_params
from pipeline.console import verbose
from pipeline.io import exclusive_lock
from pipeline.registry import STAGES

# One DVC run per checkout at a time: DVC locks the repo, and a second run would otherwise fail on the
# lock (or interleave its params.yaml with the first). A file lock in the checkout, so separate
# checkouts (fan-out workers) never wait on each other, and a killed run's lock dies with it.
DVC_SLOT = ".locks/dvc-run.lock"

# Task retries only where a failure is transient: the Kaggle download (ingest with source kaggle),
# the upload (submit) and the DVC remote (push). Everything else fails at once: retrying bad input or
# a bug only delays the error. The submit stage already retries 429/5xx/connection errors itself
# (submit.max_retries), so one task retry is enough there (an upload attempt may spend a daily slot).
TRANSIENT_RETRIES = {"ingest": 2, "submit": 1, "push": 2}
RETRY_DELAYS_S = [30, 120]
# Stages with an effect outside the repository: never restored from DVC's run cache (that would
# check out a previous run's outputs without uploading anything).
SIDE_EFFECT_STAGES = {"submit"}
TAIL_LINES = 15
_PREFECT_CONSOLE_LINE = re.compile(r"^\d\d:\d\d:\d\d\.\d+ \| ")


class StageFailed(RuntimeError):
    """A DVC stage failed; the message names the stage, DVC's reason and the stage's last stderr lines."""

    def __init__(self, stage: str, reason: str, tail: Iterable[str] = ()):
        self.stage = stage
        self.reason = reason
        self.tail = [line for line in tail if line.strip()]
        text = f"stage '{stage}' failed: {reason}"
        if self.tail:
            text += "\nlast lines of its stderr:\n" + "\n".join(f"  {line}" for line in self.tail)
        super().__init__(text)

    def __reduce__(self):
        return (type(self), (self.stage, self.reason, self.tail))


def use_this_python() -> None:
    """DVC stage commands say `python`: make that the interpreter running this flow."""
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


# ---------------------------------------------------------------------------- stderr tail


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except OSError:  # the original stderr went away: keep draining the pipe anyway
            return


@contextlib.contextmanager
def stderr_tail(lines: int = TAIL_LINES) -> Iterator[deque[str]]:
    """Tee file descriptor 2 (which the stage's subprocess inherits) through a pipe: everything still
    reaches the original stderr, and the last ``lines`` lines are kept for the error message."""
    tail: deque[str] = deque(maxlen=lines)
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump() -> None:
        partial = b""
        try:
            while chunk := os.read(read_fd, 65536):
                _write_all(saved, chunk)
                *done, partial = (partial + chunk).split(b"\n")
                for raw in done:
                    line = raw.decode(errors="replace").rsplit("\r", 1)[-1].rstrip()
                    if line and not _PREFECT_CONSOLE_LINE.match(line):
                        tail.append(line[:500])
            if partial.strip():
                tail.append(partial.decode(errors="replace")[:500])
        finally:
            os.close(read_fd)

    reader = threading.Thread(target=pump, name="stderr-tail", daemon=True)
    reader.start()
    try:
        yield tail
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes our last write end of the pipe: the reader sees EOF
        reader.join(timeout=5)
        os.close(saved)


@contextlib.contextmanager
def dvc_messages() -> Iterator[list[str]]:
    """DVC's own log messages while the block runs (e.g. "Stage 'x' is cached - skipping run"),
    collected instead of printed unless verbose (DVC prints them itself and, through the root
    logger, Prefect again)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            with contextlib.suppress(Exception):
                messages.append(record.getMessage())

    handler = Collect(logging.INFO)
    dvc_logger = logging.getLogger("dvc")
    saved = (dvc_logger.handlers[:], dvc_logger.propagate)
    if not verbose():
        dvc_logger.handlers, dvc_logger.propagate = [], False
    dvc_logger.addHandler(handler)
    try:
        yield messages
    finally:
        dvc_logger.handlers, dvc_logger.propagate = saved


def _reason(err: BaseException) -> str:
    """DVC's error and its causes, one line."""
    parts, seen, current = [], set(), err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip()
        if text and text not in parts:
            parts.append(text)
        current = current.__cause__ or current.__context__
    return "; ".join(parts) or type(err).__name__


# ---------------------------------------------------------------------------- tasks


@task(name="configure", cache_policy=NO_CACHE)
def configure(profile: str, overrides: dict[str, Any] | None, root: str) -> str:
    """Resolve the profile + overrides into params.yaml (what every DVC stage reads)."""
    cfg = load_profile(profile, overrides)
    return str(write_params(cfg, Path(root) / PARAMS_FILE))


@task(cache_policy=NO_CACHE)
def run_dvc_stage(stage: str, root: str, force: bool = False, run_cache: bool = True, pull: bool = False) -> list[str]:
    """`dvc repro <stage> --single-item [--pull]`: runs the stage only if its deps, params or code
    changed, or restores its outputs from DVC's run cache when this exact run was made before (with
    ``pull``, also from the remote's run cache: a stage another worker ran and pushed)."""
    start = time.monotonic()
    require_complete_params(stage, root)
    names, how = reproduce(stage, root, force=force, run_cache=run_cache, pull=pull)
    get_run_logger().info("%s: %s", stage, HOW_TEXT[how])
    CONSOLE.info(stage_line(stage, names, how, time.monotonic() - start, root))
    return names


def require_complete_params(stage: str, root: str) -> None:
    """``StageFailed`` before DVC starts when params.yaml is not a complete, valid resolved config: DVC
    deletes a per-fold stage's outputs before it notices a params section missing, and its message
    would not say how to regenerate the file (``load_params``'s does)."""
    try:
        load_params(Path(root) / PARAMS_FILE)
    except ConfigError as err:
        raise StageFailed(stage, f"{err} (DVC was not started: every output is as it was)") from None


HOW_TEXT = {
    "skipped": "up to date, skipped",
    "restored": "restored from the run cache (this exact run was made before, here or on another worker)",
    "ran": "ran",
}


def reproduce(stage: str, root: str, force: bool = False, run_cache: bool = True,
              pull: bool = False) -> tuple[list[str], str]:
    """`dvc repro <stage> --single-item`: the stage items DVC reproduced, and how (``HOW_TEXT``'s keys).
    A failure raises ``StageFailed``, after checking the stage's last good outputs back out where DVC
    had deleted them (outputs that are not persistent)."""
    from dvc.repo import Repo

    with stderr_tail() as tail, dvc_messages() as messages:
        try:
            # DVC resolves stage paths against the working directory, not only the repo root.
            with contextlib.chdir(root), Repo(root) as repo:
                repo.scm_context.quiet = True  # no "To track the changes with git, run ..." per stage
                ran = repo.reproduce(targets=[stage], single_item=True, force=force, run_cache=run_cache,
                                     pull=pull)
        except Exception as err:
            restored = restore_last_good_outputs(stage, root)
            raise StageFailed(stage, _reason(err) + restored, list(tail)) from err
    names = [s.addressing for s in ran]
    if not names:
        return names, "skipped"
    if any("skipping run, checking out outputs" in m for m in messages):
        return names, "restored"
    return names, "ran"


def restore_last_good_outputs(stage: str, root: str) -> str:
    """`dvc checkout <stage>`: DVC deletes a stage's non-persistent outputs before running it, so a
    failed per-fold stage would lose its last good outputs; they are in DVC's cache (dvc.lock still
    names them). Forced: what a failed or killed run left there (a TensorBoard event file, a figures
    file written just before the kill) is not a good output, and DVC refuses to overwrite unsaved
    files otherwise. Returns a note for the error message ("" when nothing was recorded)."""
    from dvc.repo import Repo

    try:
        with contextlib.chdir(root), Repo(root) as repo:
            changes = repo.checkout(targets=[stage], allow_missing=True, force=True)
    except Exception as err:  # noqa: BLE001  (the stage's own error is the one to report)
        return f" (its last good outputs could not be checked out again: {_reason(err)})"
    added = [*changes.get("added", []), *changes.get("modified", [])]
    return f"; its last good outputs were checked out again from DVC's cache ({len(added)} path(s))" if added else ""


def stage_task(stage: str, retries: int = 0):
    """The Prefect task for one DVC stage, named after it."""
    return run_dvc_stage.with_options(
        name=stage, task_run_name=stage, retries=retries, retry_delay_seconds=RETRY_DELAYS_S if retries else 0
    )


def stage_retries(stage: str, cfg: Config) -> int:
    """Retries only for the stages whose failures are transient: the Kaggle download and the upload."""
    if stage == "ingest":
        return TRANSIENT_RETRIES["ingest"] if cfg.ingest.source == "kaggle" else 0
    return TRANSIENT_RETRIES["submit"] if stage == "submit" else 0


def run_stages(cfg: Config, root: str, stages: Iterable[str] | None = None, force: Iterable[str] = (),
               pull: bool = False) -> dict[str, list[str]]:
    """Every stage (dvc.yaml order, from the registry), one task each; stops at the first failure."""
    force = set(force)
    return {
        stage: stage_task(stage, stage_retries(stage, cfg))(
            stage, root, force=stage in force, run_cache=stage not in SIDE_EFFECT_STAGES, pull=pull)
        for stage in (STAGES if stages is None else stages)
    }


@task(name="dvc-push", cache_policy=NO_CACHE, retries=TRANSIENT_RETRIES["push"],
      retry_delay_seconds=RETRY_DELAYS_S)
def push_cache(root: str) -> int:
    """`dvc push --run-cache` to the default remote (`.dvc/config`; a local folder unless configured
    otherwise), so another checkout can `dvc pull` instead of recomputing."""
    from dvc.config import NoRemoteError
    from dvc.repo import Repo

    logger = get_run_logger()
    with contextlib.chdir(root), Repo(root) as repo:
        try:
            pushed = repo.push(run_cache=True)
        except NoRemoteError:
            logger.info("dvc push skipped: no default DVC remote configured")
            return 0
        remote = repo.config["core"].get("remote")
    logger.info("dvc push: %d file(s) to remote %r", pushed, remote)
    return pushed


# ---------------------------------------------------------------------------- the DVC slot


@contextlib.contextmanager
def dvc_slot(root: str) -> Iterator[None]:
    """Hold the checkout's DVC slot from configure to push: a second run on the same checkout waits here
    ("waiting for ...") instead of failing on DVC's lock. A file lock, not a Prefect concurrency limit:
    the OS releases it when its holder dies, where a limit's slot stays leased to a killed flow."""
    logger = get_run_logger()
    start = time.monotonic()
    with exclusive_lock(Path(root) / DVC_SLOT, f"the DVC slot of {root}",
                        on_wait=lambda holder: logger.info("waiting for the DVC slot of %s (held by %s): one DVC "
                                                           "run per checkout at a time", root, holder)):
        logger.info("DVC section start (waited %.1fs)", time.monotonic() - start)
        try:
            yield
        finally:
            logger.info("DVC section end")


# ---------------------------------------------------------------------------- results


def read_metrics(root: str) -> dict[str, Any]:
    """reports/metrics.json (stage -> figures) of the checkout at ``root``; {} before any report."""
    from pipeline.io import read_json

    path = load_params(Path(root) / PARAMS_FILE).paths.path("metrics")
    return read_json(path) if path.exists() else {}


def stage_order(name: str) -> int:
    order = list(STAGES)
    base = name.split("@")[0]
    return order.index(base) if base in order else len(order)


def headline(metrics: dict[str, Any]) -> tuple[str, float] | None:
    """(stage, valid_logloss) of the last stage in DAG order that reports one."""
    found = [(s, f["valid_logloss"]) for s, f in metrics.items()
             if isinstance(f, dict) and isinstance(f.get("valid_logloss"), int | float)]
    if not found:
        return None
    stage, value = max(found, key=lambda item: stage_order(item[0]))
    return stage, float(value)


# The figures the metrics artifact shows (the stage files hold many more; see reports/report.html).
TABLE_FIGURES = ("valid_logloss", "valid_acc", "test_logloss", "test_acc", "seconds")


def metrics_table(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage (DAG order) with its headline figures, rounded, for the UI."""
    rows = []
    for stage in sorted(metrics, key=stage_order):
        figures = metrics[stage] if isinstance(metrics[stage], dict) else {}
        row: dict[str, Any] = {"stage": stage}
        for key in TABLE_FIGURES:
            value = figures.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                row[key] = round(value, 5)
        rows.append(row)
    columns = ["stage"] + [k for k in TABLE_FIGURES if any(k in row for row in rows)]
    return [{c: row.get(c, "") for c in columns} for row in rows]


def publish_metrics(metrics: dict[str, Any], ran: dict[str, list[str]], profile: str) -> None:
    """The run's metrics table and what ran, as Prefect artifacts (UI: the flow run's Artifacts tab)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    if metrics:
        create_table_artifact(metrics_table(metrics), key="statefarm-metrics",
                              description=f"reports/metrics.json after this run (profile {profile})")
    stages_run = [s for s, names in ran.items() if names]
    best = headline(metrics)
    lines = [f"**profile** `{profile}`", "",
             "**stages run:** " + (", ".join(f"`{s}`" for s in stages_run) or "none (all up to date)")]
    if best:
        lines += ["", f"**validation log loss:** {best[1]:.5f} (`{best[0]}`)"]
    create_markdown_artifact("\n".join(lines), key="statefarm-run", description="what this run did")


def publish_submission(text: str, figures: dict[str, Any] | None = None) -> None:
    from prefect.artifacts import create_markdown_artifact

    lines = [text]
    if figures:
        lines += ["", "| figure | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in figures.items() if not isinstance(v, dict | list)]
    create_markdown_artifact("\n".join(lines), key="statefarm-submission", description="Kaggle submission result")
