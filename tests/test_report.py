import json

from pipeline.metrics import write_stage_metrics
from pipeline.report import run


def test_report_collects_stage_figures_in_dag_order(smoke_cfg):
    write_stage_metrics(smoke_cfg.paths.stage_metrics_file("split"), {"n_valid": 3})
    write_stage_metrics(smoke_cfg.paths.stage_metrics_file("ingest"), {"n_train": 9})
    run(smoke_cfg)
    metrics = json.loads(smoke_cfg.paths.path("metrics").read_text())
    assert list(metrics) == ["ingest", "split"]
    assert metrics["split"] == {"n_valid": 3}
    html = smoke_cfg.paths.path("report_html").read_text()
    assert "<h3>ingest</h3>" in html and "n_train" in html


def test_report_table_shows_log_loss_per_stage(smoke_cfg):
    write_stage_metrics(smoke_cfg.paths.stage_metrics_file("head"), {"valid_logloss": 0.51234, "valid_acc": 0.8})
    run(smoke_cfg)
    html = smoke_cfg.paths.path("report_html").read_text()
    assert "<td>head</td><td>0.5123</td><td>0.8000</td>" in html
