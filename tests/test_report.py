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
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.competition import Competition, write_competition  # noqa: E402
from pipeline.competitions.statefarm import CLASSES  # noqa: E402
from pipeline.errors import BadInputError  # noqa: E402
from pipeline.metrics import write_predictions  # noqa: E402
from pipeline.stages import report  # noqa: E402


def test_every_section_degrades_gracefully_without_inputs(smoke_cfg):
    run(smoke_cfg)
    page = smoke_cfg.paths.path("report_html").read_text()
    for text in ("No stage has produced predictions yet", "Waiting for the ensemble stage", "No training logs yet",
                 "No validation predictions yet", "No stage has written figures yet"):
        assert text in page
    assert page.startswith("<!doctype html>") and page.endswith("</html>")


def constructed_validation(cfg, n=40, sources=("ensemble",), classes=CLASSES, has_groups=True):
    """competition.json, split.csv, two real tiny JPEGs in data/raw with train_index.csv, predictions
    per source, a log."""
    rng = np.random.default_rng(0)
    ids = [f"img_{i}.jpg" for i in range(n)]
    labels = np.arange(n) % len(classes)
    raw = cfg.paths.path("raw")
    write_competition(raw, Competition(tuple(classes), "img", has_groups, "subject" if has_groups else "image",
                                       "folder", "synthetic"))
    groups = "p002" if has_groups else ids
    split = pd.DataFrame({"id": ids, "label": [classes[c] for c in labels], "group": groups, "split": "valid", "fold": 0})
    cfg.paths.path("split_csv").parent.mkdir(parents=True, exist_ok=True)
    split.to_csv(cfg.paths.path("split_csv"), index=False)
    (raw / "imgs/train/c0").mkdir(parents=True)
    for img in ids[:2]:
        Image.new("RGB", (64, 48), (200, 30, 30)).save(raw / "imgs/train/c0" / img)
    pd.DataFrame({"id": ids, "path": [f"imgs/train/c0/{i}" for i in ids], "label": classes[0],
                  "group": groups if has_groups else ""}).to_csv(raw / "train_index.csv", index=False)
    for source in sources:
        probs = rng.dirichlet(np.ones(len(classes)), size=n)
        probs[np.arange(n), labels] += rng.random(n) * 2
        write_predictions(cfg.paths.path("predictions") / source / "valid.csv", ids, probs / probs.sum(1, keepdims=True),
                          classes)
    log = cfg.paths.path("models") / "head" / "logs" / "metrics.csv"
    log.parent.mkdir(parents=True)
    pd.DataFrame({"epoch": [0, 0, 1, 1], "step": [1, 1, 2, 2], "train/loss": [2.0, None, 1.5, None],
                  "valid/logloss": [None, 2.1, None, 1.7]}).to_csv(log, index=False)
    return ids, labels


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
    assert "40 validation images (whole held-out groups of subject)" in page


def test_report_names_classes_from_the_predictions_header_and_says_validation_is_per_image(smoke_cfg):
    """Any competition: class names come from the predictions file (here 5 string names, one needing
    escaping), and without groups the page says validation is per image, never "whole drivers"."""
    classes = ("cat", "dog", "fox & hound", "owl", "yak")
    constructed_validation(smoke_cfg, n=30, classes=classes, has_groups=False)
    run(smoke_cfg)
    page = smoke_cfg.paths.path("report_html").read_text()
    head = "".join(f"<th>{name}</th>" for name in ("cat", "dog", "fox &amp; hound", "owl", "yak"))
    assert f"<table class='cm'><tr><th></th>{head}</tr>" in page  # confusion matrix: 5 x 5, header order
    assert page.count("<tr><th>owl</th>") == 1 and page.split("<table class='cm'>")[1].count("<tr>") == 6
    assert ">fox &amp; hound</text>" in page  # per-class log loss bar label
    assert "true yak" in page and "pred c0" not in page and "<th>c0</th>" not in page
    assert "30 validation images (held-out images: this competition has no groups, so validation is per image)" in page
    assert "whole drivers" not in page and "State Farm" not in page


def test_report_refuses_a_split_label_outside_the_predictions_classes_naming_its_row(smoke_cfg):
    """An unknown label is reported at its own row of split.csv."""
    constructed_validation(smoke_cfg)
    split_csv = smoke_cfg.paths.path("split_csv")
    split = pd.read_csv(split_csv)
    split.loc[7, "label"] = "c10"
    split.iloc[::-1].to_csv(split_csv, index=False)  # reversed: row 7 of the data is row 34 of the file
    with pytest.raises(BadInputError, match="label 'c10' is not a class") as info:
        run(smoke_cfg)
    assert info.value.file == split_csv and info.value.row == 34


def test_five_views_follow_the_course_definitions():
    probs = np.full((4, 10), 0.01)
    probs[0, 0], probs[1, 0], probs[2, 1], probs[3, 0] = 0.91, 0.6, 0.91, 0.3  # rows 0,1 right; 2,3 wrong
    probs[3, 5] = 0.29  # row 3: top two almost tied
    probs /= probs.sum(1, keepdims=True)
    preds = report.ValidPredictions("x", np.array(["a", "b", "c", "d"]), probs, np.array([0, 0, 0, 5]), list(CLASSES))
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
