"""The report page: ``templates/report.html.j2`` filled with a :class:`pipeline.report.view.Report`.
Text is escaped by the template engine; the charts are drawn here, as inline SVG (``pipeline.report.plots``)."""

from __future__ import annotations

from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from pipeline.report.plots import bar_chart, confusion_chart, learning_curves_chart, reliability_chart
from pipeline.report.view import (
    SCORE_KEYS,
    BarChart,
    ConfusionChart,
    LearningChart,
    ReliabilityChart,
    Report,
    figure,
)

TEMPLATE = Path(__file__).parent / "templates" / "report.html.j2"
SECTIONS = (  # (anchor, title) in page order: the table of contents
    ("cv", "Cross-validation"), ("learning", "Learning curves"), ("ensemble", "Ensemble and test-neighbour smoothing"),
    ("calibration", "Calibration"), ("oof", "Out-of-fold predictions"), ("confusion", "Confusion matrix"),
    ("breakdown", "Log loss per class and per group"), ("views", "Five views"), ("timings", "Stage timings"),
    ("runs", "Log loss per stage run"), ("run", "Run: revision and config"), ("figures", "All figures"),
)


def chart(spec: BarChart | LearningChart | ConfusionChart | ReliabilityChart) -> str:
    """The inline SVG of a chart of the view (the template marks it safe: matplotlib escapes its labels)."""
    if isinstance(spec, BarChart):
        return bar_chart(spec.labels, spec.values, spec.title, spec.xlabel, counts=spec.counts,
                    reference=spec.reference, unit=spec.unit)
    if isinstance(spec, LearningChart):
        return learning_curves_chart(spec.model, spec.losses, spec.rates, spec.rate_x)
    if isinstance(spec, ConfusionChart):
        return confusion_chart(spec.matrix, spec.classes, spec.title)
    return reliability_chart(spec.confidence, spec.accuracy, spec.count, spec.title)


def environment() -> Environment:
    env = Environment(loader=FileSystemLoader(TEMPLATE.parent), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["fig"] = figure
    env.globals.update(chart=chart, sections=dict(SECTIONS), toc=SECTIONS, dash="\u2013", score_keys=SCORE_KEYS, zip=zip)
    return env


def render(report: Report) -> str:
    return environment().get_template(TEMPLATE.name).render(r=report)
