"""The last Kaggle submission's figures (a small state file next to the reports) and the rule the
scheduled retrain follows: submit only when the validation log loss improved on it, like with like."""

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


def compared_figure(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """What "better" is measured by: the headline stage's ``valid_logloss`` with what makes two of them
    comparable (validation mode, labelled rows), and the submission's estimate beside it for the record."""
    best = headline(metrics)
    if best is None:
        return None
    stage, value = best
    figures = metrics.get(stage, {})
    return {"stage": stage, "valid_logloss": value, "validation": figures.get("validation"), "n_valid": figures.get("n_valid"),
            "submission_estimate": figures.get("submission_logloss_estimate"),
            "submission_estimate_method": figures.get("submission_estimate_method")}


def describe(figure: dict[str, Any]) -> str:
    """``calibrate's valid_logloss 0.51234 (cv, 549 labelled rows)``"""
    scope = ", ".join(str(part) for part in (figure.get("validation"),
                                             figure.get("n_valid") and f"{figure['n_valid']} labelled rows") if part)
    return f"{figure.get('stage')}'s valid_logloss {float(figure['valid_logloss']):.5f}" + (f" ({scope})" if scope else "")


def should_submit(metrics: dict[str, Any], last: dict[str, Any] | None, min_improvement: float = 0.0) -> tuple[bool, str]:
    """(submit?, why): only when the headline valid_logloss beats the last submission's, compared like
    with like: the same stage, validation mode and labelled rows. When the last submission was scored
    on another of those (new data, another validation mode), the two figures say nothing about each
    other: the retrained model is submitted, and the reason says so."""
    now = compared_figure(metrics)
    if now is None:
        return False, "no stage reports valid_logloss yet: nothing to submit"
    if last is None or last.get("valid_logloss") is None:
        return True, f"first submission: {describe(now)}"
    differs = [key for key in ("stage", "validation", "n_valid") if last.get(key) is not None and last.get(key) != now[key]]
    if differs:
        return True, (f"{describe(now)} is not comparable with the last submission's {describe(last)} "
                      f"(another {', '.join(differs)}): submitting the retrained model")
    previous = float(last["valid_logloss"])
    if now["valid_logloss"] < previous - min_improvement:
        return True, f"improved: {describe(now)} < {previous:.5f} (last submission, same figure)"
    return False, f"{describe(now)} did not improve on the last submission's {previous:.5f} (same figure): not submitting"


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
    best = compared_figure(metrics)
    state = {
        **(best or {"stage": None, "valid_logloss": None}),
        "profile": profile,
        "submitted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "result": figures,
    }
    atomic_write_json(state_path(root), state)
    text = "submitted" + (f": {describe(best)}" if best else "")
    logger.info("%s; recorded in %s", text, state_path(root))
    publish_submission(text, figures)
    return True
