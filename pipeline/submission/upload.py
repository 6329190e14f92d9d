"""The submission's way to Kaggle, through the official ``kaggle`` client (``pipeline.kaggle_client``),
or the exact commands a dry run prints. What goes up follows ``competition.submission``:

- ``file``: the file itself (``kaggle competitions submit -f``).
- ``code``: Kaggle hides the test images, so ``reports/kaggle/`` gets the models dataset (``upload/``)
  and a notebook that recomputes the chain's predictions on Kaggle offline (``kernel/``,
  ``pipeline.kernel``); the dataset is uploaded, the notebook pushed and run, and the submission.csv
  it writes submitted (``kaggle competitions submit -k -v``).

The upload message carries ``submit.message``, the code revision (git short sha, ``-dirty`` when
tracked files differ) and the data revision (sha256 of the submission), so a leaderboard entry can
be traced back to what produced it. Predictions from generated data are refused before any upload.
Credentials are never read into anything this module writes or logs.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
from pathlib import Path
from typing import Any

from pipeline.competition import Competition
from pipeline.config import Config
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
from pipeline.kernel.export import write_code_submission
from pipeline.kernel.script import SUBMISSION_FILE

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------- whether to upload


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
