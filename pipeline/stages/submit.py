"""``submit`` stage: the calibrated test predictions as a validated Kaggle submission, uploaded through
the official ``kaggle`` client (or a dry run that prints the exact commands).

The file is built and validated against ``sample_submission.csv`` before it replaces anything
(``pipeline.submission``), so nothing unvalidated is ever uploaded. What is uploaded follows
``competition.submission``:

- ``file``: the file itself (``kaggle competitions submit -f``).
- ``code``: Kaggle hides the test images, so ``reports/kaggle/`` gets the models dataset (``upload/``)
  and a notebook that recomputes the chain's predictions on Kaggle offline (``kernel/``,
  ``pipeline.kernel``); the dataset is uploaded, the notebook pushed and run, and the submission.csv
  it writes submitted (``kaggle competitions submit -k -v``). The file here is the reference the
  notebook reproduces.

The upload message carries ``submit.message``, the code revision (git short sha, ``-dirty`` when
tracked files differ) and the data revision (sha256 of the submission), so a leaderboard entry can
be traced back to what produced it. The outcome is recorded in ``reports/submission.json``.
Credentials are never read into anything this module writes or logs.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.competition import Competition, read_competition
from pipeline.config import Config
from pipeline.io import atomic_dir, atomic_write_json, file_sha256
from pipeline.kaggle_client import (
    SubmitError,
    account_name,
    code_submission,
    configured_username,
    credentials_found,
    kaggle_api,
    lookup_score,
    upload_once,
    with_retries,
)
from pipeline.kernel.export import code_folder, write_code_submission
from pipeline.kernel.script import SUBMISSION_FILE
from pipeline.metrics import write_stage_metrics
from pipeline.submission import build_submission

log = logging.getLogger(__name__)

SOURCE_STAGE = "calibrate"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------- revisions, command


def code_revision(repo: Path = PROJECT_ROOT) -> str:
    """Git short sha of the code, ``-dirty`` when tracked files differ from it; "unknown" without git."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "diff", "--quiet", "HEAD", "--"], capture_output=True,
                               timeout=30).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "") if sha else "unknown"


def submission_message(base: str, code_rev: str, data_rev: str) -> str:
    return f"{base} | code {code_rev} | data {data_rev}"


def double_quoted(text: str) -> str:
    """``text`` inside double quotes, safe for a POSIX shell."""
    return '"' + "".join("\\" + ch if ch in '\\"$`' else ch for ch in text) + '"'


def submit_command(competition: str, path: Path, message: str) -> str:
    return f"kaggle competitions submit -c {shlex.quote(competition)} -f {shlex.quote(str(path))} -m {double_quoted(message)}"


def code_commands(competition: str, folders: dict[str, Any], message: str, dataset_upload: str | None = None,
                  version: int | None = None) -> list[str]:
    """The four client commands of a code competition's submission. Before a run, whether the dataset
    exists and the notebook version its push makes are unknown: the first line says both ways, the
    last has ``VERSION`` for the number ``kaggle kernels push`` prints."""
    upload, kernel = shlex.quote(str(folders["upload"])), folders["kernel_ref"]
    create, new_version = f"kaggle datasets create -p {upload}", f"kaggle datasets version -p {upload} -m {double_quoted(message)}"
    dataset = {"created": create, "versioned": new_version}.get(dataset_upload or "", f"{new_version}  # the first time: {create}")
    return [dataset, f"kaggle kernels push -p {shlex.quote(str(folders['kernel']))}", f"kaggle kernels status {kernel}",
            f"kaggle competitions submit -c {shlex.quote(competition)} -k {kernel} -v {version or 'VERSION'} "
            f"-f {SUBMISSION_FILE} -m {double_quoted(message)}"]


# ---------------------------------------------------------------------------- upload


def upload(cfg: Config, path: Path, message: str) -> dict[str, Any]:
    api = kaggle_api()
    competition = cfg.ingest.competition
    # Each attempt redoes the whole sequence (start upload, PUT, create): an upload token may be spent.
    # A 5xx on CreateSubmission can hide a submission that was made; the record's attempts count shows it.
    (ref, reply), attempts = with_retries(lambda: upload_once(api, path, competition, message),
                                          cfg.submit.max_retries, cfg.submit.backoff_s)
    log.info("submitted %s to %s: reference %d (%s)", path, competition, ref, reply)
    return {"reference": ref, "server_message": reply, "attempts": attempts,
            **lookup_score(api, competition, ref, cfg.submit.score_wait_s)}


def code_competition(cfg: Config, message: str, dry_run: bool) -> tuple[list[str], dict[str, Any]]:
    """(commands, outcome) of a code competition: the dataset and notebook folders written
    (``pipeline.kernel.export``); unless a dry run, the dataset uploaded, the notebook pushed and run on
    Kaggle, its submission.csv submitted and the score looked up (``pipeline.kaggle_client``)."""
    api = None if dry_run else kaggle_api()
    owner = cfg.submit.owner or configured_username() or (account_name(api) if api is not None else None)
    if api is not None and owner is None:
        raise SubmitError("submit.owner is not set and the credentials name no Kaggle username: set submit.owner to "
                          "the account that owns the models dataset and the notebook")
    folders = write_code_submission(cfg, owner)
    outcome = {"owner": owner, "dataset": folders["dataset_ref"], "kernel": folders["kernel_ref"],
               "upload_dir": str(folders["upload"]), "kernel_dir": str(folders["kernel"])}
    if api is None:
        return code_commands(cfg.ingest.competition, folders, message), outcome
    s = cfg.submit
    outcome |= code_submission(api, folders["upload"], folders["dataset_ref"], folders["kernel"], folders["kernel_ref"],
                               cfg.ingest.competition, SUBMISSION_FILE, message, s.max_retries, s.backoff_s,
                               s.kernel_wait_s, s.poll_s, s.score_wait_s)
    return code_commands(cfg.ingest.competition, folders, message, outcome["dataset_upload"], outcome["kernel_version"]), outcome


# ---------------------------------------------------------------------------- stage


def refuse_synthetic_upload(cfg: Config, competition: Competition) -> None:
    """Predictions made from generated data must never reach Kaggle: the source ingest recorded decides."""
    if cfg.submit.enabled and competition.synthetic:
        raise SubmitError(f"refusing to upload: these predictions come from synthetic data (ingest.source="
                          f"{competition.source}, recorded in data/raw/competition.json). Run ingest on the real "
                          "competition files (ingest.source=kaggle, zip or dir) or set submit.enabled=false")


def dry_run_reason(cfg: Config) -> str | None:
    if not cfg.submit.enabled:
        return "submit.enabled is false"
    if not credentials_found():
        return "no Kaggle credentials (KAGGLE_USERNAME/KAGGLE_KEY or ~/.kaggle/kaggle.json)"
    return None


def run(cfg: Config) -> dict:
    competition = read_competition(cfg.paths.path("raw"))
    refuse_synthetic_upload(cfg, competition)
    sample_path = cfg.paths.path("raw") / cfg.competition.sample_submission
    out = cfg.paths.path("submission")
    n_rows = build_submission(cfg.paths.path("predictions") / SOURCE_STAGE / "test.csv", sample_path, out,
                              SOURCE_STAGE)

    code_rev, sha = code_revision(), file_sha256(out)
    message = submission_message(cfg.submit.message, code_rev, sha[:12])
    reason = dry_run_reason(cfg)
    result: dict[str, Any] = {}
    if cfg.competition.submission == "code":
        commands, result = code_competition(cfg, message, dry_run=reason is not None)
    else:
        with atomic_dir(code_folder(cfg)):
            pass  # a file competition has no dataset or notebook: the folder (a DVC output) stays empty
        commands = [submit_command(cfg.ingest.competition, out, message)]
        if not reason:
            result = upload(cfg, out, message)
    if reason:
        owner_note = ("\n(set submit.owner to your Kaggle username)" if cfg.competition.submission == "code"
                      and not result.get("owner") else "")
        print(f"dry run ({reason}); to upload:\n" + "\n".join(commands) + owner_note)

    record = {
        "kind": cfg.competition.submission,  # file: submission.csv uploaded; code: submitted from the notebook's run
        "competition": cfg.ingest.competition,
        "file": str(cfg.paths.submission),
        "sha256": sha,
        "n_rows": n_rows,
        "message": message,
        "code_revision": code_rev,
        "data_revision": sha[:12],
        "dry_run": reason is not None,
        "dry_run_reason": reason,
        "command": commands[-1],
        "commands": commands,
        "reference": None,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
        **result,
    }
    atomic_write_json(cfg.paths.path("reports") / "submission.json", record)
    figures = {"kind": record["kind"], "n_rows": n_rows, "dry_run": reason is not None, "reference": record["reference"],
               **{key: record[key] for key in ("kernel", "kernel_version") if record.get(key) is not None}}
    if record.get("public_score") is not None:
        figures["public_score"] = record["public_score"]
    write_stage_metrics(cfg.paths.stage_metrics_file("submit"), figures)
    return figures
