"""The console of `python -m flows.pipeline` (and `make demo`): one line per stage (ran, up to date
or restored from the run cache; time; headline figure), then a table of every model's CV (and, on
synthetic data, hidden-test) log loss and accuracy and where the report is. Prefect's own console
lines (task states, DVC's messages) are kept for ``--verbose``; the Prefect UI and API get every
log line either way."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.config import PARAMS_FILE, load_params
from pipeline.console import ORCHESTRATED_ENV, headline, verbose
from pipeline.io import read_json
from pipeline.registry import model_rank
from pipeline.report.view import submission_estimate

CONSOLE = logging.getLogger("statefarm.console")
CONSOLE.propagate = False  # no handler unless `python -m flows.pipeline` installs one: Prefect's logs carry the same
HOW_SHORT = {"skipped": "up to date", "restored": "from run cache", "ran": "ran"}


def use_quiet_console() -> None:
    """Stage lines and the results table on stderr; Prefect's console handler only for warnings."""
    from prefect.logging.handlers import PrefectConsoleHandler

    if verbose():
        return
    os.environ[ORCHESTRATED_ENV] = "1"  # the stages leave their "done" line to this console
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setLevel(logging.WARNING)
    if not CONSOLE.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        CONSOLE.addHandler(handler)
        CONSOLE.setLevel(logging.INFO)


def stage_figures(root: str, items: list[str]) -> dict[str, Any]:
    """reports/stages/<item>.json of each item DVC reproduced (absent ones left out)."""
    cfg = load_params(Path(root) / PARAMS_FILE)
    files = {item: cfg.paths.stage_metrics_file(item) for item in items}
    return {item: read_json(path) for item, path in files.items() if path.exists()}


def stage_line(stage: str, items: list[str], how: str, seconds: float, root: str) -> str:
    figures = stage_figures(root, items) if how != "skipped" else {}
    shown = headline(figures) if figures else ""
    count = f" ({len(items)} items)" if len(items) > 1 else ""
    return f"  {stage:<10} {HOW_SHORT[how] + count:<24} {seconds:7.1f}s  {shown}".rstrip()


def score_rows(folder: Path) -> list[tuple[str, dict[str, float]]]:
    """reports/scores/<model>.json in DAG order: head, finetune, pseudo, members, ensemble, calibrate."""
    found = {path.stem: read_json(path) for path in sorted(folder.glob("*.json"))} if folder.exists() else {}
    return [(name, found[name]) for name in sorted(found, key=model_rank)]


def results_table(root: str) -> str:
    """Every model's scores (what `dvc metrics show` shows, as a table) and the report's path."""
    cfg = load_params(Path(root) / PARAMS_FILE)
    rows = score_rows(cfg.paths.path("scores"))
    report = cfg.paths.path("report_html")
    if not rows:
        return f"no scores yet ({cfg.paths.scores}); report: {report}"
    est = "cv" if any("cv_logloss" in figs for _, figs in rows) else "valid"
    columns = [(f"{est}_logloss", f"{est.upper()} log loss"), (f"{est}_logloss_std", "+/- folds"),
               (f"{est}_acc", f"{est.upper()} acc"), ("test_logloss", "test log loss"), ("test_acc", "test acc")]
    columns = [(key, title) for key, title in columns if any(key in figs for _, figs in rows)]
    lines = [f"  {'model':<10}" + "".join(f"{title:>15}" for _, title in columns)]
    for name, figs in rows:
        lines.append(f"  {name:<10}" + "".join(f"{figs[key]:>15.4f}" if key in figs else f"{'':>15}" for key, _ in columns))
    if "test_logloss" in dict(columns):
        lines.append("  (test: the hidden labels of the synthetic data; a real competition has none)")
    calibrate = cfg.paths.stage_metrics_file("calibrate")
    if (estimate := submission_estimate(read_json(calibrate) if calibrate.exists() else {})) is not None:
        interval = (f", {estimate.level:.0%} interval over the test's drivers [{estimate.low:.4f}, {estimate.high:.4f}]"
                    if estimate.low is not None and estimate.high is not None and estimate.level else "")
        lines.append(f"  the submission is estimated at {estimate.value:.4f} ({estimate.method}){interval}")
    lines.append(f"report: {report}")
    return "\n".join(lines)
