"""The last Kaggle submission's score (a small state file next to the reports) and the rule the
scheduled retrain follows: submit only when the validation log loss improved on it."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from flows.tasks import headline, publish_submission
from pipeline.config import PARAMS_FILE, load_params
from pipeline.io import atomic_write_json, read_json

SUBMIT_STAGE = "submit"
STATE_NAME = "last_submission.json"  # under paths.reports


def state_path(root: str) -> Path:
    return load_params(Path(root) / PARAMS_FILE).paths.path("reports") / STATE_NAME


def read_last_submission(root: str) -> dict[str, Any] | None:
    path = state_path(root)
    return read_json(path) if path.exists() else None


def should_submit(metrics: dict[str, Any], last: dict[str, Any] | None, min_improvement: float = 0.0) -> tuple[bool, str]:
    """(submit?, why): only when the headline valid_logloss beats the last submission's."""
    best = headline(metrics)
    if best is None:
        return False, "no stage reports valid_logloss yet: nothing to submit"
    stage, value = best
    if last is None or last.get("valid_logloss") is None:
        return True, f"first submission: valid_logloss {value:.5f} ({stage})"
    previous = float(last["valid_logloss"])
    if value < previous - min_improvement:
        return True, f"valid_logloss improved: {value:.5f} ({stage}) < {previous:.5f} (last submission)"
    return False, (f"valid_logloss {value:.5f} ({stage}) did not improve on the last submission's "
                   f"{previous:.5f}: not submitting")


def note_submission(ran: dict[str, list[str]], metrics: dict[str, Any], profile: str, root: str) -> bool:
    """After a run with submit.enabled=true: record the score if the submit stage ran, and show the
    result in the UI. Returns whether a submission was made."""
    logger = get_run_logger()
    cfg = load_params(Path(root) / PARAMS_FILE)
    stage_file = cfg.paths.stage_metrics_file(SUBMIT_STAGE)
    figures = read_json(stage_file) if stage_file.exists() else metrics.get(SUBMIT_STAGE, {})
    if not ran.get(SUBMIT_STAGE):
        text = "submit stage up to date: this exact submission was already made, nothing uploaded"
        logger.info(text)
        publish_submission(text, figures)
        return False
    if figures.get("dry_run"):
        record_file = cfg.paths.path("reports") / "submission.json"
        why = (read_json(record_file).get("dry_run_reason") if record_file.exists() else None) or "see the submit stage's log"
        text = f"dry run, nothing uploaded: {why}"
        logger.warning(text)
        publish_submission(text, figures)
        return False
    best = headline(metrics)
    state = {
        "stage": best[0] if best else None,
        "valid_logloss": best[1] if best else None,
        "profile": profile,
        "submitted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "result": figures,
    }
    atomic_write_json(state_path(root), state)
    text = "submitted" + (f": valid_logloss {best[1]:.5f} ({best[0]})" if best else "")
    logger.info("%s; recorded in %s", text, state_path(root))
    publish_submission(text, figures)
    return True
