import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.competition import Competition, write_competition
from pipeline.competitions.statefarm import CLASSES
from pipeline.config import MODELS, load_profile
from pipeline.errors import BadInputError, StageError
from pipeline.metrics import write_predictions, write_stage_metrics
from pipeline.stages import report
from pipeline.stages.report import run


def page_of(cfg) -> str:
    run(cfg)
    return cfg.paths.path("report_html").read_text()


def stage_json(cfg, name, figures):
    write_stage_metrics(cfg.paths.stage_metrics_file(name), figures)


def section(page: str, title: str) -> str:
    """The HTML between ``<h2 id=...>title</h2>`` and the next ``<h2``."""
    parts = re.split(rf"<h2[^>]*>{re.escape(title)}</h2>", page, maxsplit=1)
    assert len(parts) == 2, f"no section {title!r}"
    return parts[1].split("<h2", 1)[0]


def table_row(html: str, first_cell: str) -> list[str]:
    """The cells (inner HTML) of the row whose first cell is ``first_cell``."""
    row = re.search(rf"<tr><td>{re.escape(first_cell)}</td>(.*?)</tr>", html)
    assert row, f"no row {first_cell!r}"
    return re.findall(r"<td>(.*?)</td>", row.group(1))


# ---------------------------------------------------------------------------- metrics.json


def test_report_collects_stage_figures_in_dag_order(smoke_cfg):
    stage_json(smoke_cfg, "split", {"n_valid": 3})
    stage_json(smoke_cfg, "ingest", {"n_train": 9})
    page = page_of(smoke_cfg)
    metrics = json.loads(smoke_cfg.paths.path("metrics").read_text())
    assert list(metrics) == ["ingest", "split"]
    assert metrics["split"] == {"n_valid": 3}
    assert "<summary>ingest</summary>" in page and "n_train" in page


def test_stage_order_puts_every_fold_item_after_its_stage():
    order = report.stage_order([0, 1, 2], [0, 5])
    for stage in MODELS:  # the chain: one item per fold each
        at = order.index(stage)
        assert order[at:at + 4] == [stage, f"{stage}@0", f"{stage}@1", f"{stage}@2"]
    at = order.index("member")
    assert order[at:at + 8] == ["member", "member@0-0", "member@0-1", "member@0-2", "member@5-0", "member@5-1",
                                "member@5-2", "oof"]  # matrix items: member, then fold; oof gathers them
    assert order.index("features") < order.index("head") and order.index("calibrate") < order.index("report")
    assert not any(name.startswith(("ingest@", "oof@", "ensemble@")) for name in order)


def test_metrics_follow_the_per_fold_dag_order_and_drop_stale_items(tmp_path, monkeypatch):
    """Written in scrambled order; fold 2 and member 3 are not in the config (stale files)."""
    monkeypatch.setattr(report, "STAGES", {"head": "", "member": "", "ensemble": ""})
    cfg = load_profile("smoke", {"ensemble.members": [2, 10]}).at(tmp_path)
    assert cfg.split.fold_ids == [0, 1]
    for name in ("ensemble", "member@10-1", "member@2-1", "head@1", "member@10-0", "head@2", "member@3-0", "head@0",
                 "member@2-0", "head"):
        stage_json(cfg, name, {"valid_logloss": 1.0})
    run(cfg)
    metrics = json.loads(cfg.paths.path("metrics").read_text())
    assert list(metrics) == ["head", "head@0", "head@1", "member@2-0", "member@2-1", "member@10-0", "member@10-1",
                             "ensemble"]


def test_holdout_mode_has_one_fold_item_per_stage(tmp_path):
    cfg = load_profile("smoke", {"split.validation": "holdout"}).at(tmp_path)
    for name in ("head@0", "head@1", "member@0-0", "member@0-1"):
        stage_json(cfg, name, {"valid_logloss": 1.0})
    run(cfg)
    assert list(json.loads(cfg.paths.path("metrics").read_text())) == ["head@0", "member@0-0"]


def test_report_table_shows_log_loss_per_stage_run(smoke_cfg):
    stage_json(smoke_cfg, "head@1", {"valid_logloss": 0.51234, "valid_acc": 0.8, "fold": 1})
    page = page_of(smoke_cfg)
    assert "<td>head@1</td><td>0.5123</td><td>0.8000</td><td></td><td></td>" in section(page, "Log loss per stage run")


def test_every_section_degrades_gracefully_without_inputs(smoke_cfg):
    page = page_of(smoke_cfg)
    for text in ("No stage has produced predictions yet", "Waiting for the oof stage", "Waiting for the ensemble stage",
                 "Waiting for the calibrate stage", "No training logs yet", "No out-of-fold predictions yet",
                 "No stage has written figures yet", "No stage has reported its time yet"):
        assert text in page
    assert page.startswith("<!doctype html>") and page.endswith("</html>")
    # DVC's views exist (empty) so the stage's outputs are whole right after `sample`
    assert list(smoke_cfg.paths.path("scores").iterdir()) == []
    assert smoke_cfg.paths.path("plots").is_dir()


# ---------------------------------------------------------------------------- cross-validation


def fold_figures(losses, n=(40, 40)):
    folds = {str(k): {"logloss": loss, "acc": 0.5, "n": size} for k, (loss, size) in enumerate(zip(losses, n, strict=True))}
    mean = float(np.mean(losses))
    return {"folds": folds, "fold_logloss_mean": mean, "fold_logloss_std": float(np.std(losses, ddof=1))}


def oof_json(cfg, cv_losses: dict[str, float], test: bool = True, validation: str = "cv"):
    """oof.json with one entry per model, CV log loss as given; fold losses CV -/+ 0.1."""
    models = {}
    for name, loss in cv_losses.items():
        models[name] = {"valid_logloss": loss, "valid_acc": 0.8, **fold_figures([loss - 0.1, loss + 0.1])}
        if test:
            models[name] |= {"test_logloss": loss + 0.1, "test_acc": 0.7}
    best = min(cv_losses, key=cv_losses.get)
    stage_json(cfg, "oof", {"validation": validation, "n_folds": 2, "n_oof": 80, "models": models, "best_model": best,
                            "best_valid_logloss": cv_losses[best], "seconds": 0.1})


def ensemble_json(cfg, **overrides):
    figures = {
        "valid_logloss": 0.35, "valid_acc": 0.85, "test_logloss": 0.45, "test_acc": 0.75, "validation": "cv",
        "valid_logloss_insample": 0.31, "valid_logloss_before_smoothing": 0.38, "test_logloss_before_smoothing": 0.47,
        "weights_method": "hill_climb", "mean": "arithmetic",
        "weights": {"finetune": 0.6, "head": 0.1, "member0": 0.3},  # sorted keys, as atomic_write_json writes them
        "weights_by_fold": [{"head": 0.2, "finetune": 0.5, "member0": 0.3}, {"head": 0.0, "finetune": 0.7, "member0": 0.3}],
        "fallback": None, "best_model": "finetune", "best_model_valid_logloss": 0.4, "beats_best_model": True,
        "smoothing_k": 2, "smoothing_applied": True, "smoothing_valid_logloss_by_k": [[1, 0.37], [2, 0.35], [3, 0.36]],
        "candidates": {m: {"valid_logloss": v, "valid_acc": 0.8, "test_logloss": v + 0.1, "test_acc": 0.7}
                       for m, v in (("finetune", 0.4), ("head", 0.5), ("member0", 0.45))},
    }
    stage_json(cfg, "ensemble", figures | overrides)


def calibrate_json(cfg, **overrides):
    figures = {"valid_logloss": 0.33, "valid_acc": 0.85, "valid_logloss_before": 0.35, "valid_logloss_nested": 0.33,
               "valid_logloss_insample": 0.32, "applied": True, "temperature": 1.3, "clip_lo": 0.001, "clip_hi": 0.99,
               "fitted_temperature": 1.3, "fitted_clip_lo": 0.001, "fitted_clip_hi": 0.99,
               "curve": [{"confidence": 0.45, "accuracy": 0.35, "n": 30}, {"confidence": 0.85, "accuracy": 0.75, "n": 50}],
               "test_logloss": 0.44, "test_acc": 0.75, "test_logloss_before": 0.45, "test_acc_before": 0.75}
    stage_json(cfg, "calibrate", figures | overrides)


def test_cv_table_shows_hidden_test_beside_cv_for_each_model_and_stage(smoke_cfg):
    oof_json(smoke_cfg, {"member0": 0.45, "pseudo": 0.42, "head": 0.5, "finetune": 0.4})
    ensemble_json(smoke_cfg)
    calibrate_json(smoke_cfg)
    cv = section(page_of(smoke_cfg), "Cross-validation")
    assert "<th>CV log loss</th><th>CV acc</th><th>fold log loss mean ± std</th><th>hidden test log loss</th>" in cv
    # CV, accuracy, fold mean ± std (losses 0.4 and 0.6), then hidden test beside it and the gap
    assert table_row(cv, "head")[:6] == ["0.5000", "0.8000", "0.5000 ± 0.1414", "0.6000", "0.7000", "+0.1000"]
    assert table_row(cv, "ensemble (nested CV)")[:6] == ["0.3500", "0.8500", "–", "0.4500", "0.7500", "+0.1000"]
    assert table_row(cv, "calibrate (nested CV)")[:5] == ["0.3300", "0.8500", "–", "0.4400", "0.7500"]
    labels = re.findall(r"<tr><td>([^<]*)</td>", cv.split("<h3>")[0])
    assert labels == ["head", "finetune", "pseudo", "member0", "ensemble (nested CV)", "calibrate (nested CV)"]
    assert "No hidden test labels" not in cv


def test_cv_table_and_scores_give_the_fold_averaged_submissions_estimate(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4})
    ensemble_json(smoke_cfg)
    calibrate_json(smoke_cfg, fold_averaging_gain=0.04, submission_logloss_estimate=0.29)
    page = page_of(smoke_cfg)
    cv = section(page, "Cross-validation")
    row = table_row(cv, "submission estimate (CV − fold averaging gain)")
    assert row[0] == "0.2900" and row[3:5] == ["0.4400", "0.7500"] and "gains 0.0400" in row[-1]
    assert "averaging gains 0.0400 on the test images (label-free), so the submission's estimate is 0.2900" in page
    assert read_scores(smoke_cfg)["calibrate"]["submission_estimate"] == 0.29
    calibrate_json(smoke_cfg, fold_averaging_gain=None, submission_logloss_estimate=0.33)  # holdout: nothing averaged
    assert "submission estimate" not in section(page_of(smoke_cfg), "Cross-validation")
    assert "submission_estimate" not in read_scores(smoke_cfg)["calibrate"]


def test_cv_table_without_hidden_labels_has_no_test_columns(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4}, test=False)
    cv = section(page_of(smoke_cfg), "Cross-validation")
    assert "hidden test log loss" not in cv and "No hidden test labels" in cv
    assert table_row(cv, "finetune") == ["0.4000", "0.8000", "0.4000 ± 0.1414", ""]


def test_a_chain_step_worse_than_its_predecessor_is_flagged(smoke_cfg):
    """finetune is worse than head; pseudo beats finetune (its predecessor) though not head; a member
    is never compared with the chain."""
    oof_json(smoke_cfg, {"head": 0.4, "finetune": 0.5, "pseudo": 0.45, "member0": 0.9})
    cv = section(page_of(smoke_cfg), "Cross-validation")
    assert table_row(cv, "finetune")[-1] == "<b class='bad'>worse than head</b>"
    assert table_row(cv, "head")[-1] == table_row(cv, "pseudo")[-1] == table_row(cv, "member0")[-1] == ""
    assert cv.count("worse than") == 1

    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4, "pseudo": 0.41})
    cv = section(page_of(smoke_cfg), "Cross-validation")
    assert table_row(cv, "pseudo")[-1] == "<b class='bad'>worse than finetune</b>" and cv.count("worse than") == 1


def test_chain_flags_compare_with_the_nearest_model_present():
    assert report.chain_flags({"head": {"valid_logloss": 0.4}, "pseudo": {"valid_logloss": 0.5}}) == {"pseudo": "head"}
    assert report.chain_flags({"head": {"valid_logloss": 0.4}, "finetune": {"valid_logloss": 0.4}}) == {}  # a tie is no worse
    assert report.chain_flags({"finetune": {"valid_logloss": 0.4}, "member0": {"valid_logloss": 0.1}}) == {}


def test_an_ensemble_fallback_is_flagged(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4})
    ensemble_json(smoke_cfg, fallback="finetune", beats_best_model=False, valid_logloss=0.4,
                  valid_logloss_before_smoothing=0.4, weights={"finetune": 1.0, "head": 0.0, "member0": 0.0})
    page = page_of(smoke_cfg)
    assert table_row(section(page, "Cross-validation"), "ensemble (nested CV)")[-1].startswith(
        "<b class='bad'>fallback: finetune</b>")
    assert "fallback: finetune" in section(page, "Ensemble and test-neighbour smoothing")


def test_an_ensemble_that_beats_its_best_model_is_not_flagged(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4})
    ensemble_json(smoke_cfg)
    row = table_row(section(page_of(smoke_cfg), "Cross-validation"), "ensemble (nested CV)")
    assert row[-1] == "<span class='ok'>beats finetune</span> (-0.0200)" and "bad" not in "".join(row)


def test_per_fold_table_has_a_column_per_fold_and_a_row_per_model(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4})
    folds = section(page_of(smoke_cfg), "Cross-validation").split("<h3>Log loss per fold</h3>")[1]
    assert "<tr><th>model</th><th>fold 0 (n = 40)</th><th>fold 1 (n = 40)</th></tr>" in folds
    assert table_row(folds, "head") == ["0.4000", "0.6000"]
    assert table_row(folds, "finetune") == ["<b>0.3000</b>", "<b>0.5000</b>"]  # the best of each fold


def test_holdout_mode_says_validation_not_cv(tmp_path):
    cfg = load_profile("smoke", {"split.validation": "holdout"}).at(tmp_path)
    oof_json(cfg, {"head": 0.5}, validation="holdout")
    cv = section(page_of(cfg), "Cross-validation")
    assert "<th>validation log loss</th>" in cv and "CV log loss" not in cv


# ---------------------------------------------------------------------------- ensemble and calibration


def test_ensemble_section_shows_weights_method_nested_and_smoothing(tmp_path):
    cfg = load_profile("smoke", {"ensemble.include": ["head", "finetune"], "ensemble.members": [0]}).at(tmp_path)
    ensemble_json(cfg)
    ens = section(page_of(cfg), "Ensemble and test-neighbour smoothing")
    assert "hill-climbing ensemble selection" in ens and "arithmetic mean of 3 candidates" in ens
    assert "nested <b>0.3800</b>" in ens and "in-sample 0.3100" in ens
    assert "Best single model finetune, CV log loss 0.4000" in ens
    # each nested fit's weights, by model
    assert table_row(ens, "head")[:4] == ["0.1000", "0.20, 0.00", "0.5000", "0.8000"]
    assert table_row(ens, "finetune")[:2] == ["0.6000", "0.50, 0.70"]
    assert "<b class='ok'>applied</b> with k = 2" in ens
    assert [table_row(ens, k)[0] for k in ("0 (none)", "1", "2 (chosen)", "3")] == ["0.3800", "0.3700", "0.3500", "0.3600"]
    assert "Hidden test log loss 0.4700 before, 0.4500 after" in ens


def test_ensemble_section_without_smoothing(smoke_cfg):
    ensemble_json(smoke_cfg, smoothing_k=0, smoothing_applied=False, smoothing_valid_logloss_by_k=[])
    ens = section(page_of(smoke_cfg), "Ensemble and test-neighbour smoothing")
    assert "Test-neighbour smoothing is off" in ens and "(chosen)" not in ens


def test_calibration_section_draws_the_oof_curve(smoke_cfg):
    calibrate_json(smoke_cfg, applied=False, temperature=1.0)
    cal = section(page_of(smoke_cfg), "Calibration")
    assert chart_titles(cal) == ["Calibration curve: calibrate, out-of-fold"]
    assert "Expected calibration error <b>0.1000</b>" in cal  # (30 * 0.10 + 50 * 0.10) / 80
    assert "<b class='bad'>not applied</b>" in cal and "nested 0.3300" in cal and "in-sample 0.3200" in cal
    # the bins with their image counts, beside the chart
    assert "<tr><td>0.450</td><td>0.350</td><td>30</td></tr><tr><td>0.850</td><td>0.750</td><td>50</td></tr>" in cal


# ---------------------------------------------------------------------------- learning curves


def write_log(path, columns: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(columns).to_csv(path, index=False)


def fold_logs(cfg):
    models = cfg.paths.path("models")
    log = {"epoch": [0, 0, 1, 1], "step": [1, 1, 2, 2], "train/loss": [2.0, None, 1.5, None],
           "train/lr": [1e-4, None, 1e-3, None], "valid/logloss": [None, 2.1, None, 1.7]}
    for fold in (0, 1):
        write_log(models / "head" / f"fold{fold}" / "logs" / "metrics.csv", log)
    write_log(models / "pseudo" / "fold1" / "iteration_2" / "logs" / "metrics.csv", log)
    write_log(models / "oldmodel" / "logs" / "metrics.csv", log)  # the pre-CV layout: not a fold model's log


def chart_titles(html: str) -> list[str]:
    """The title of each inline SVG chart (matplotlib's, labelled by plots.to_svg)."""
    return re.findall(r"<svg class='chart' role='img' aria-label='([^']*)'", html)


def svg_texts(html: str) -> set[str]:
    """Every text drawn in the charts: titles, axis labels, ticks, legend entries."""
    return set(re.findall(r"<text[^>]*>([^<]*)</text>", html))


def test_cv_learning_curves_show_training_loss_and_lr_per_fold_only(smoke_cfg):
    fold_logs(smoke_cfg)
    curves = section(page_of(smoke_cfg), "Learning curves")
    assert chart_titles(curves) == ["head: learning curves", "pseudo: learning curves"]
    texts = svg_texts(curves)
    # a loss line per fold; both folds share one learning-rate schedule, drawn once
    assert {"fold0", "fold1", "every fold", "fold1 iteration_2", "Loss", "Learning rate", "epoch"} <= texts
    assert "valid/logloss" not in curves and "valid" not in texts  # fold models never validate on their own rows in cv


def test_cross_pseudo_students_are_averaged_into_the_models_dvc_plot(smoke_cfg):
    """Cross pseudo-labelling logs one run per student (``iteration_1/half_<h>``): DVC's learning plot is
    the model's, the mean over folds and students, like any fold model's."""
    models = smoke_cfg.paths.path("models")
    for fold in (0, 1):
        for half, losses in ((0, [2.0, 1.0]), (1, [4.0, 3.0])):
            write_log(models / "pseudo" / f"fold{fold}" / "iteration_1" / f"half_{half}" / "logs" / "metrics.csv",
                      {"epoch": [0, 1], "step": [1, 2], "train/loss": losses, "train/lr": [1e-4, 1e-3]})
    curves = section(page_of(smoke_cfg), "Learning curves")
    assert {"fold0 iteration_1 half_0", "fold1 iteration_1 half_1"} <= svg_texts(curves)
    loss = pd.read_csv(smoke_cfg.paths.path("plots") / "learning" / "pseudo.csv")
    assert loss.to_dict(orient="list") == {"epoch": [0, 1], "train_loss": [3.0, 2.0]}
    assert sorted(p.name for p in (smoke_cfg.paths.path("plots") / "learning").iterdir()) == ["pseudo.csv"]


def test_holdout_learning_curves_keep_the_validation_loss(tmp_path):
    cfg = load_profile("smoke", {"split.validation": "holdout"}).at(tmp_path)
    fold_logs(cfg)
    curves = section(page_of(cfg), "Learning curves")
    assert {"fold0 train", "fold0 valid"} <= svg_texts(curves)


def monitored_log(path, groups=("head", "pg2")):
    """A fine-tune log with Lightning's LearningRateMonitor: per-step rows carry only step and lr-*."""
    rows = []
    for epoch in (0, 1):
        for step in range(epoch * 3, epoch * 3 + 3):
            rows.append({"step": step} | {f"lr-AdamW/{g}": 1e-3 * (step + 1) / (10 if i else 1) for i, g in enumerate(groups)})
        rows.append({"epoch": epoch, "step": epoch * 3 + 2, "train/loss": 2.0 - epoch, "train/lr": 1e-3})
    write_log(path, pd.DataFrame(rows).to_dict(orient="list"))


def test_learning_rates_come_from_the_lr_monitor_per_step_when_logged(smoke_cfg):
    for fold in (0, 1):
        monitored_log(smoke_cfg.paths.fold_models("finetune", fold) / "logs" / "metrics.csv")
    curves = section(page_of(smoke_cfg), "Learning curves")
    assert chart_titles(curves) == ["finetune: learning curves"]
    assert {"head", "pg2", "optimizer step"} <= svg_texts(curves)  # one line per param group, shared by the folds
    rate = pd.read_csv(smoke_cfg.paths.path("plots") / "learning_rate" / "finetune.csv")
    assert list(rate.columns) == ["step", "lr"] and rate["step"].tolist() == list(range(6))
    assert rate["lr"].tolist() == pytest.approx([1e-3 * (s + 1) for s in range(6)])  # the top group (head)
    loss = pd.read_csv(smoke_cfg.paths.path("plots") / "learning" / "finetune.csv")
    assert loss.to_dict(orient="list") == {"epoch": [0, 1], "train_loss": [2.0, 1.0]}


def test_a_log_without_any_learning_rate_still_draws_its_loss(smoke_cfg):
    write_log(smoke_cfg.paths.fold_models("head", 0) / "logs" / "metrics.csv", {"epoch": [0, 1], "train/loss": [2.0, 1.5]})
    curves = section(page_of(smoke_cfg), "Learning curves")
    assert chart_titles(curves) == ["head: learning curves"] and "Learning rate" not in svg_texts(curves)
    plots = smoke_cfg.paths.path("plots")
    assert (plots / "learning" / "head.csv").exists() and not (plots / "learning_rate").exists()


def test_training_logs_are_in_natural_order(tmp_path):
    for folder in ("member10/fold0", "member2/fold10", "member2/fold2", "head/fold0"):
        write_log(tmp_path / folder / "logs" / "metrics.csv", {"epoch": [0], "train/loss": [1.0]})
    logs = report.training_logs(tmp_path)
    assert list(logs) == ["head", "member2", "member10"]
    assert [run for run, _ in logs["member2"]] == ["fold2", "fold10"]


# ---------------------------------------------------------------------------- out-of-fold predictions


def constructed_oof(cfg, n=40, sources=("ensemble",), classes=CLASSES, has_groups=True):
    """competition.json, split.csv (two folds), two real tiny JPEGs in data/raw with train_index.csv,
    out-of-fold predictions per source (calibrate/ensemble: data/predictions/<stage>/oof.csv; models:
    data/predictions/oof/<model>/oof.csv)."""
    rng = np.random.default_rng(0)
    ids = [f"img_{i}.jpg" for i in range(n)]
    labels = np.arange(n) % len(classes)
    folds = (np.arange(n) // 2) % 2
    raw = cfg.paths.path("raw")
    write_competition(raw, Competition(tuple(classes), "img", has_groups, "subject" if has_groups else "image",
                                       "folder", "synthetic"))
    groups = [f"p00{f}" for f in folds] if has_groups else ids
    split = pd.DataFrame({"id": ids, "label": [classes[c] for c in labels], "group": groups, "split": "train",
                          "fold": folds})
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
        folder = (cfg.paths.path("predictions") / source if source in ("calibrate", "ensemble")
                  else cfg.paths.oof_predictions(source))
        write_predictions(folder / "oof.csv", ids, probs / probs.sum(1, keepdims=True), classes, folds=folds)
    return ids, labels


def test_report_draws_each_section_from_the_best_predictions(smoke_cfg):
    constructed_oof(smoke_cfg, sources=("head", "ensemble", "calibrate"))
    fold_logs(smoke_cfg)
    page = page_of(smoke_cfg)
    assert "Out-of-fold predictions: calibrate" in page  # calibrate > ensemble > ... > head
    assert "40 labelled images, each predicted by a model that never trained on it (2-fold cross-validation grouped " \
           "by subject), from data/predictions/calibrate/oof.csv" in page
    for text in ("<table class='cm'>", "Confusion matrix: calibrate, out-of-fold", "Log loss per true class",
                 "Log loss per subject", "Calibration curve: calibrate, out-of-fold", "head: learning curves",
                 "<h3>random correct</h3>", "<h3>random incorrect</h3>", "<h3>most correct per class</h3>",
                 "<h3>most incorrect per class</h3>", "<h3>most uncertain</h3>"):
        assert text in page
    assert page.count("data:image/jpeg;base64,") >= 1  # thumbnails embedded; missing files keep their caption
    assert "<div class='noimg'></div>" in page
    assert "Validation: 2-fold cross-validation grouped by subject." in page


def test_report_falls_back_to_a_gathered_model_and_ignores_old_valid_files(smoke_cfg):
    constructed_oof(smoke_cfg, sources=("finetune", "head"))
    write_predictions(smoke_cfg.paths.path("predictions") / "calibrate" / "valid.csv", ["img_0.jpg"],
                      np.full((1, 10), 0.1), CLASSES)  # the pre-CV layout
    page = page_of(smoke_cfg)
    assert "Out-of-fold predictions: finetune" in page and "from data/predictions/oof/finetune/oof.csv" in page
    assert page.split("<table class='cm'>")[1].split("</table>")[0].count("<tr>") == 11  # all 40 rows, 10 classes


def test_confusion_matrix_counts_every_oof_row_once(smoke_cfg):
    ids, labels = constructed_oof(smoke_cfg, n=40)
    preds = report.find_oof_predictions(smoke_cfg)
    assert isinstance(preds, report.OOFPredictions) and preds.probs.shape == (40, 10)  # fold column skipped
    assert list(preds.ids) == ids and (preds.labels == labels).all()
    assert report.confusion_matrix(preds.labels, preds.predicted, 10).sum() == 40


def test_report_names_classes_from_the_predictions_header_and_says_validation_is_per_image(smoke_cfg):
    """Any competition: class names come from the predictions file (here 5 string names, one needing
    escaping), and without groups the page says the folds are over images, never "whole drivers"."""
    classes = ("cat", "dog", "fox & hound", "owl", "yak")
    constructed_oof(smoke_cfg, n=30, classes=classes, has_groups=False)
    page = page_of(smoke_cfg)
    head = "".join(f"<th>{name}</th>" for name in ("cat", "dog", "fox &amp; hound", "owl", "yak"))
    assert f"<table class='cm'><tr><th></th>{head}</tr>" in page  # confusion matrix: 5 x 5, header order
    assert page.count("<tr><th>owl</th>") == 1 and page.split("<table class='cm'>")[1].count("<tr>") == 6
    assert ">fox &amp; hound</text>" in page  # per-class log loss bar label
    assert "true yak" in page and "pred c0" not in page and "<th>c0</th>" not in page
    assert "30 labelled images, each predicted by a model that never trained on it (2-fold cross-validation over " \
           "images (this competition has no groups))" in page
    assert "whole drivers" not in page and "State Farm" not in page


def test_holdout_validation_keeps_the_held_out_wording(tmp_path):
    cfg = load_profile("smoke", {"split.validation": "holdout"}).at(tmp_path)
    constructed_oof(cfg)
    assert "Validation: whole held-out groups of subject." in page_of(cfg)


def test_report_refuses_a_split_label_outside_the_predictions_classes_naming_its_row(smoke_cfg):
    """An unknown label is reported at its own row of split.csv."""
    constructed_oof(smoke_cfg)
    split_csv = smoke_cfg.paths.path("split_csv")
    split = pd.read_csv(split_csv)
    split.loc[7, "label"] = "c10"
    split.iloc[::-1].to_csv(split_csv, index=False)  # reversed: row 7 of the data is row 34 of the file
    with pytest.raises(BadInputError, match="label 'c10' is not a class") as info:
        run(smoke_cfg)
    assert info.value.file == split_csv and info.value.row == 34


def test_five_views_follow_the_course_definitions(tmp_path):
    probs = np.full((4, 10), 0.01)
    probs[0, 0], probs[1, 0], probs[2, 1], probs[3, 0] = 0.91, 0.6, 0.91, 0.3  # rows 0,1 right; 2,3 wrong
    probs[3, 5] = 0.29  # row 3: top two almost tied
    probs /= probs.sum(1, keepdims=True)
    preds = report.OOFPredictions("x", tmp_path / "oof.csv", np.array(["a", "b", "c", "d"]), probs,
                                  np.array([0, 0, 0, 5]), list(CLASSES))
    views = report.five_views(preds)
    assert views["most correct per class"] == [0]  # predicted c0 and right, highest p(c0)
    assert views["most incorrect per class"] == [3, 2]  # per predicted class: c0 -> row 3, c1 -> row 2
    assert views["most uncertain"][0] == 3
    assert sorted(views["random correct"]) == [0, 1] and sorted(views["random incorrect"]) == [2, 3]


# ---------------------------------------------------------------------------- DVC views


def read_scores(cfg, rerun: bool = True) -> dict[str, dict]:
    if rerun:
        run(cfg)
    return {p.stem: json.loads(p.read_text()) for p in sorted(cfg.paths.path("scores").glob("*.json"))}


def test_scores_are_one_compact_file_per_model_then_ensemble_and_calibrate(smoke_cfg):
    """DVC draws a row per file and a column per key: per model its CV figures and hidden-test ones."""
    oof_json(smoke_cfg, {"head": 0.5, "finetune": 0.4, "member0": 0.45})
    ensemble_json(smoke_cfg)
    calibrate_json(smoke_cfg)
    scores = read_scores(smoke_cfg)
    assert sorted(scores) == ["calibrate", "ensemble", "finetune", "head", "member0"]
    assert scores["head"] == pytest.approx({"cv_logloss": 0.5, "cv_logloss_std": 0.1414214, "cv_acc": 0.8,
                                            "test_logloss": 0.6, "test_acc": 0.7})
    assert scores["calibrate"] == {"cv_logloss": 0.33, "cv_acc": 0.85, "test_logloss": 0.44, "test_acc": 0.75}
    assert set(scores["ensemble"]) == {"cv_logloss", "cv_acc", "test_logloss", "test_acc"}


def test_scores_without_hidden_labels_or_in_holdout_mode(tmp_path):
    cfg = load_profile("smoke", {"split.validation": "holdout"}).at(tmp_path)
    oof_json(cfg, {"head": 0.5}, test=False, validation="holdout")
    assert read_scores(cfg) == {"head": pytest.approx({"valid_logloss": 0.5, "valid_logloss_std": 0.1414214,
                                                       "valid_acc": 0.8})}


def test_a_model_dropped_from_the_config_leaves_no_stale_score(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5, "member7": 0.4})
    assert sorted(read_scores(smoke_cfg)) == ["head", "member7"]
    oof_json(smoke_cfg, {"head": 0.5})
    assert sorted(read_scores(smoke_cfg)) == ["head"]


def test_a_non_finite_figure_is_refused_and_the_last_scores_stay(smoke_cfg):
    oof_json(smoke_cfg, {"head": 0.5})
    run(smoke_cfg)
    oof_json(smoke_cfg, {"head": float("nan")})
    with pytest.raises(StageError, match=r"head\.json: a score is not finite .*column cv_logloss"):
        run(smoke_cfg)
    assert read_scores(smoke_cfg, rerun=False)["head"]["cv_logloss"] == 0.5


def test_plot_data_for_dvc_confusion_and_calibration(smoke_cfg):
    ids, labels = constructed_oof(smoke_cfg, n=40, sources=("head", "calibrate"))
    run(smoke_cfg)
    plots = smoke_cfg.paths.path("plots")
    confusion = pd.read_csv(plots / "confusion.csv", dtype=str)
    assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 40  # one row per image
    assert confusion["actual"].tolist() == [CLASSES[c] for c in labels]  # class names, as DVC's template shows them
    assert set(confusion["predicted"]) <= set(CLASSES)
    calibration = pd.read_csv(plots / "calibration.csv")
    assert list(calibration.columns) == ["bin", "confidence", "accuracy", "perfectly_calibrated", "count"]
    assert calibration["count"].sum() == 40 and (calibration["confidence"] == calibration["perfectly_calibrated"]).all()
    for path in [*plots.rglob("*.csv"), *smoke_cfg.paths.path("scores").glob("*.json")]:
        assert not re.search(r"\b(nan|inf)\b", path.read_text(), re.IGNORECASE), path


def test_per_group_log_loss_names_the_competition_group(smoke_cfg):
    constructed_oof(smoke_cfg)
    page = page_of(smoke_cfg)
    groups = section(page, "Log loss per class and per subject")
    assert chart_titles(groups) == ["Log loss per true class", "Log loss per subject"]
    assert {"p000", "p001"} <= svg_texts(groups)  # a bar per driver
    assert any(t.startswith("all images: ") for t in svg_texts(groups))  # the overall log loss to compare with


def test_timings_config_and_revision(smoke_cfg, monkeypatch):
    stage_json(smoke_cfg, "ingest", {"seconds": 1.5})
    stage_json(smoke_cfg, "head@0", {"seconds": 30.0, "valid_logloss": 1.0})
    page = page_of(smoke_cfg)
    assert chart_titles(section(page, "Stage timings")) == ["Seconds per stage run (sum 0.5 min)"]
    assert {"ingest", "head@0", "30.0 s"} <= svg_texts(section(page, "Stage timings"))
    run_part = section(page, "Run: revision and config")
    assert "<details><summary>Config of this run (params.yaml)</summary><pre>profile: smoke" in run_part
    assert "not a git checkout" in run_part  # tmp dirs are no git repository: said, not failed
    # git missing altogether must not fail the stage either
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(report.subprocess, "run", no_git)
    assert "unknown (git is not available)" in page_of(smoke_cfg)


def test_revision_of_a_git_checkout_names_the_files_changed_since(tmp_path):
    import subprocess

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    git("init", "-q")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    git("add", "params.yaml")
    git("commit", "-qm", "x")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert report.git_revision(tmp_path) == f"<code>{sha}</code>"
    (tmp_path / "params.yaml").write_text("a: 2\n")  # what `dvc exp run -S` does
    assert report.git_revision(tmp_path) == f"<code>{sha}</code> with uncommitted changes to params.yaml"


def test_the_header_says_which_kind_of_submission_was_made():
    from pipeline.stages.report import submission_line

    code = submission_line({"kind": "code", "dry_run": False, "kernel": "me/comp-inference", "kernel_version": 3})
    assert "code competition" in code and "https://www.kaggle.com/code/me/comp-inference" in code and "version 3" in code
    assert "dry run" in submission_line({"kind": "file", "dry_run": True}) and "submission.csv" in submission_line({"kind": "file"})
    assert submission_line({}) == ""
