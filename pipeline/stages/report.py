"""``report`` stage: what a Kaggler looks at after a run (``pipeline.report`` says what each file holds).

- ``reports/metrics.json``: every stage's figures, stage name -> figures in DAG order;
- ``reports/scores/<model>.json`` and ``reports/plots/``: what ``dvc metrics`` and ``dvc plots`` read;
- ``reports/report.html``: one static page that opens offline.

Every file is written atomically; the page is rendered from a typed view of the figures and the best
out-of-fold predictions (calibrate > ensemble > pseudo > finetune > head).
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.config import Config
from pipeline.io import atomic_write_text
from pipeline.report.collect import collect_metrics
from pipeline.report.dvcviews import scores, write_plot_data, write_scores
from pipeline.report.predictions import find_oof_predictions
from pipeline.report.render import render
from pipeline.report.view import build_report


def run(cfg: Config) -> dict[str, Any]:
    metrics = collect_metrics(cfg.paths.path("stage_metrics"), cfg.split.fold_ids, cfg.ensemble.members)
    # Not atomic_write_json: it sorts keys, and this map keeps DAG order.
    atomic_write_text(cfg.paths.path("metrics"), json.dumps(metrics, indent=2) + "\n")
    table = scores(metrics, cfg.split.validation == "cv")
    write_scores(cfg.paths.path("scores"), table)
    preds = find_oof_predictions(cfg)
    write_plot_data(cfg.paths.path("plots"), cfg.paths.path("models"), preds)
    atomic_write_text(cfg.paths.path("report_html"), render(build_report(cfg, metrics, preds)))
    return {"stages": list(metrics), "scores": sorted(table)}
