"""``submit`` stage: the calibrated test predictions as a validated Kaggle submission, uploaded through
the official ``kaggle`` client (or a dry run that prints the exact commands).

The file is built and validated against ``sample_submission.csv`` before it replaces anything
(``pipeline.submission.build``), so nothing unvalidated is ever uploaded. What is uploaded follows
``competition.submission`` (``pipeline.submission.upload``):

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

from datetime import UTC, datetime
from typing import Any

from pipeline.competition import read_competition
from pipeline.config import Config
from pipeline.io import atomic_dir, atomic_write_json, file_sha256
from pipeline.kernel.export import code_folder
from pipeline.metrics import write_stage_metrics
from pipeline.submission.build import build_submission
from pipeline.submission.upload import (
    code_competition,
    code_revision,
    dry_run_reason,
    refuse_synthetic_upload,
    submission_message,
    submit_command,
    upload,
)

SOURCE_STAGE = "calibrate"


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
