"""What a stage prints. Quiet by default (a line when the stage is done, with its headline figure; a
progress line at most every ``PROGRESS_EVERY_S`` seconds of training); ``--verbose`` or
``STATEFARM_VERBOSE=1`` brings back every epoch line and the figures as JSON. The figures are always
in reports/stages/<stage>.json."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

VERBOSE_ENV = "STATEFARM_VERBOSE"
# Set by `python -m flows.pipeline`, which prints each stage's line itself: the stage then prints none.
ORCHESTRATED_ENV = "STATEFARM_ORCHESTRATED"
PROGRESS_EVERY_S = 30.0
# The figure a stage line shows, first found wins: held-out log loss (the fold's rows in cv), then
# the out-of-fold estimate of the ensemble and calibration stages, then what data stages report.
HEADLINE_KEYS = (("valid_logloss", "held-out log loss"), ("cv_logloss", "CV log loss"),
                 ("n_train", "train images"), ("n_images", "images"))


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0", "false")


def orchestrated() -> bool:
    return os.environ.get(ORCHESTRATED_ENV, "0") == "1" and not verbose()


def set_verbose(on: bool) -> None:
    """Also for the stage processes DVC starts (they inherit the environment)."""
    if on:
        os.environ[VERBOSE_ENV] = "1"


def headline(figures: Mapping[str, Any]) -> str:
    """``held-out log loss 0.5865 (acc 0.812)``: the first headline figure found, for a stage with
    several items (every fold) their mean; "" when there is none."""
    top_level = any(key in figures for key, _ in HEADLINE_KEYS)
    items = [figures] if top_level else [f for f in figures.values() if isinstance(f, Mapping)]
    for key, label in HEADLINE_KEYS:
        values = [f[key] for f in items if isinstance(f.get(key), int | float) and not isinstance(f.get(key), bool)]
        if not values:
            continue
        mean = sum(values) / len(values)
        text = f"{label} {mean:.0f}" if key.startswith("n_") else f"{label} {mean:.4f}"  # counts, scores
        accs = [f["valid_acc"] for f in items if isinstance(f.get("valid_acc"), int | float)]
        if key == "valid_logloss" and accs:
            text += f" (acc {sum(accs) / len(accs):.3f})"
        if len(values) > 1:
            text += f", mean of {len(values)}"
        bounds = [items[0].get(f"submission_logloss_{end}") for end in ("estimate", "low", "high")]
        if len(items) == 1 and all(isinstance(v, int | float) for v in bounds):  # calibrate
            text += "; the submission's estimate {:.4f} [{:.4f}, {:.4f}]".format(*bounds)
        return text
    return ""
