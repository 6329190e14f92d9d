"""The report: what a Kaggler looks at after a run, in three forms (the ``report`` stage composes them).

- ``reports/metrics.json``: every stage's figures (stage name -> figures, DAG order with each per-fold
  item after its stage), :mod:`pipeline.report.collect`. The Prefect flows read it; DVC treats it as a
  plain output.
- ``reports/scores/<model>.json`` and ``reports/plots/``: what DVC's ``metrics`` and ``plots`` read
  (:mod:`pipeline.report.dvcviews`).
- ``reports/report.html``: one static page that opens offline (inline CSS, charts as inline SVG drawn by
  matplotlib in :mod:`pipeline.report.plots`, thumbnails as base64 JPEG). :mod:`pipeline.report.view`
  turns figures and out-of-fold predictions (:mod:`pipeline.report.predictions`) into typed rows;
  :mod:`pipeline.report.render` fills ``templates/report.html.j2`` with them.

Every section says what it is waiting for when its inputs are absent (the stage can run right after
``sample``). No file written here holds a non-finite number.
"""
