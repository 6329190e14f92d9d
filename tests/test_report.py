import json

from pipeline.metrics import write_stage_metrics
from pipeline.stages.report import run


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


# ---------------------------------------------------------------------------- sections

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.metrics import write_predictions  # noqa: E402
from pipeline.stages import report  # noqa: E402


def test_every_section_degrades_gracefully_without_inputs(smoke_cfg):
    run(smoke_cfg)
    page = smoke_cfg.paths.path("report_html").read_text()
    for text in ("No stage has produced predictions yet", "Waiting for the ensemble stage", "No training logs yet",
                 "No validation predictions yet", "No stage has written figures yet"):
        assert text in page
    assert page.startswith("<!doctype html>") and page.endswith("</html>")


def constructed_validation(cfg, n=40, sources=("ensemble",)):
    """split.csv, two real tiny JPEGs in data/raw with train_index.csv, predictions per source, a log."""
    rng = np.random.default_rng(0)
    imgs = [f"img_{i}.jpg" for i in range(n)]
    labels = np.arange(n) % 10
    split = pd.DataFrame({"img": imgs, "subject": "p002", "classname": [f"c{c}" for c in labels], "split": "valid", "fold": 0})
    cfg.paths.path("split_csv").parent.mkdir(parents=True, exist_ok=True)
    split.to_csv(cfg.paths.path("split_csv"), index=False)
    raw = cfg.paths.path("raw")
    (raw / "imgs/train/c0").mkdir(parents=True)
    for img in imgs[:2]:
        Image.new("RGB", (64, 48), (200, 30, 30)).save(raw / "imgs/train/c0" / img)
    pd.DataFrame({"img": imgs, "subject": "p002", "classname": "c0", "path": [f"imgs/train/c0/{i}" for i in imgs]}).to_csv(
        raw / "train_index.csv", index=False)
    for source in sources:
        probs = rng.dirichlet(np.ones(10), size=n)
        probs[np.arange(n), labels] += rng.random(n) * 2
        write_predictions(cfg.paths.path("predictions") / source / "valid.csv", imgs, probs / probs.sum(1, keepdims=True))
    log = cfg.paths.path("models") / "head" / "logs" / "metrics.csv"
    log.parent.mkdir(parents=True)
    pd.DataFrame({"epoch": [0, 0, 1, 1], "step": [1, 1, 2, 2], "train/loss": [2.0, None, 1.5, None],
                  "valid/logloss": [None, 2.1, None, 1.7]}).to_csv(log, index=False)
    return imgs, labels


def test_report_draws_each_section_from_the_best_predictions(smoke_cfg):
    constructed_validation(smoke_cfg, sources=("head", "ensemble", "calibrate"))
    write_stage_metrics(smoke_cfg.paths.stage_metrics_file("ensemble"), {
        "valid_logloss": 0.4, "mean": "arithmetic", "n_members": 1, "members": {"member@0": {"valid_logloss": 0.5}},
        "weights": {"member@0": 1.0}, "neighbours": 10, "smoothing_applied": False,
        "smoothing_valid_logloss_before": 0.4, "smoothing_valid_logloss_after": 0.45})
    run(smoke_cfg)
    page = smoke_cfg.paths.path("report_html").read_text()
    assert "Validation predictions: calibrate" in page  # calibrate > ensemble > ... > head
    for text in ("<table class='cm'>", "log loss per true class", "reliability diagram", "head/logs", "train/loss",
                 "<h3>random correct</h3>", "<h3>random incorrect</h3>", "<h3>most correct per class</h3>",
                 "<h3>most incorrect per class</h3>", "<h3>most uncertain</h3>", "not applied"):
        assert text in page
    assert page.count("data:image/jpeg;base64,") >= 1  # thumbnails embedded; missing files keep their caption
    assert "<div class='noimg'></div>" in page


def test_five_views_follow_the_course_definitions():
    probs = np.full((4, 10), 0.01)
    probs[0, 0], probs[1, 0], probs[2, 1], probs[3, 0] = 0.91, 0.6, 0.91, 0.3  # rows 0,1 right; 2,3 wrong
    probs[3, 5] = 0.29  # row 3: top two almost tied
    probs /= probs.sum(1, keepdims=True)
    preds = report.ValidPredictions("x", np.array(["a", "b", "c", "d"]), probs, np.array([0, 0, 0, 5]))
    views = report.five_views(preds)
    assert views["most correct per class"] == [0]  # predicted c0 and right, highest p(c0)
    assert views["most incorrect per class"] == [3, 2]  # per predicted class: c0 -> row 3, c1 -> row 2
    assert views["most uncertain"][0] == 3
    assert sorted(views["random correct"]) == [0, 1] and sorted(views["random incorrect"]) == [2, 3]


def test_foreach_items_follow_their_stage_in_dag_order(smoke_cfg, monkeypatch):
    monkeypatch.setattr(report, "STAGES", {"head": "", "member": "", "ensemble": ""})
    for name in ("ensemble", "member@10", "member@2", "head"):
        write_stage_metrics(smoke_cfg.paths.stage_metrics_file(name), {"valid_logloss": 1.0})
    smoke_cfg.ensemble.members = [2, 10]
    run(smoke_cfg)
    metrics = json.loads(smoke_cfg.paths.path("metrics").read_text())
    assert list(metrics) == ["head", "member@2", "member@10", "ensemble"]


def test_stale_figures_of_removed_members_are_left_out(smoke_cfg):
    """ensemble.members shrank from [0, 1, 2] to the smoke default: member@2.json is stale."""
    for member in (0, 1, 2):
        write_stage_metrics(smoke_cfg.paths.stage_metrics_file(f"member@{member}"), {"valid_logloss": 0.5})
    run(smoke_cfg)
    metrics = json.loads(smoke_cfg.paths.path("metrics").read_text())
    assert [k for k in metrics if k.startswith("member@")] == [f"member@{m}" for m in smoke_cfg.ensemble.members]
