"""``report`` stage: collect every stage's figures into ``reports/metrics.json`` (a map of stage name
to figures, DVC metrics) and render ``reports/report.html``, a static page that opens offline."""

from __future__ import annotations

import html

from pipeline.config import Config
from pipeline.io import atomic_write_json, atomic_write_text
from pipeline.metrics import collect_stage_metrics
from pipeline.stages import STAGES

SCORE_KEYS = ("valid_logloss", "valid_acc", "test_logloss", "test_acc")


def format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape(str(value))


def score_table(metrics: dict[str, dict]) -> str:
    rows = [(stage, figs) for stage, figs in metrics.items() if any(k in figs for k in SCORE_KEYS)]
    if not rows:
        return "<p>No stage has produced predictions yet.</p>"
    head = "".join(f"<th>{k}</th>" for k in SCORE_KEYS)
    body = "".join(
        f"<tr><td>{html.escape(stage)}</td>" + "".join(f"<td>{format_value(figs.get(k, ''))}</td>" for k in SCORE_KEYS) + "</tr>"
        for stage, figs in rows
    )
    return f"<table><tr><th>stage</th>{head}</tr>{body}</table>"


def figures_section(metrics: dict[str, dict]) -> str:
    parts = []
    for stage, figs in metrics.items():
        items = "".join(f"<tr><td>{html.escape(k)}</td><td>{format_value(v)}</td></tr>" for k, v in figs.items())
        parts.append(f"<h3>{html.escape(stage)}</h3><table>{items}</table>")
    return "".join(parts)


def render_html(metrics: dict[str, dict], profile: str) -> str:
    style = ("body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}th{background:#f3f3f3}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>State Farm pipeline report</title>"
            f"<style>{style}</style></head><body><h1>State Farm pipeline report</h1>"
            f"<p>profile: <b>{html.escape(profile)}</b>. Validation holds out whole drivers; test figures "
            f"exist only where hidden labels do (synthetic data).</p>"
            f"<h2>Log loss per stage</h2>{score_table(metrics)}<h2>All figures</h2>{figures_section(metrics)}"
            f"</body></html>")


def run(cfg: Config) -> dict:
    metrics = collect_stage_metrics(cfg.paths.path("stage_metrics"), list(STAGES))
    atomic_write_json(cfg.paths.path("metrics"), metrics)
    atomic_write_text(cfg.paths.path("report_html"), render_html(metrics, cfg.profile))
    return {"stages": list(metrics)}


def main() -> None:
    from pipeline.cli import main as cli_main

    raise SystemExit(cli_main(["report"]))
