"""The quiet console: a stage's headline figure (pipeline/console.py), the flow's stage line and
results table (flows/console.py)."""

from __future__ import annotations

import json

import pytest

from flows.console import results_table, score_rows, stage_line
from pipeline.config import PARAMS_FILE, load_params, load_profile, write_params
from pipeline.console import headline, set_verbose, verbose
from pipeline.io import atomic_write_json


def test_headline_is_the_held_out_log_loss_with_accuracy_and_the_mean_over_items():
    assert headline({"valid_logloss": 0.58654, "valid_acc": 0.8123, "seconds": 3}) == \
        "held-out log loss 0.5865 (acc 0.812)"
    folds = {"head@0": {"valid_logloss": 0.5, "valid_acc": 0.8}, "head@1": {"valid_logloss": 0.7, "valid_acc": 0.6}}
    assert headline(folds) == "held-out log loss 0.6000 (acc 0.700), mean of 2"
    assert headline({"cv_logloss": 0.41}) == "CV log loss 0.4100"
    assert headline({"n_train": 1200, "seconds": 1.0}) == "train images 1200"
    assert headline({"seconds": 1.0}) == ""
    # a stage's own figures first, not those of its parts (pseudo's iterations)
    assert headline({"valid_logloss": 0.5, "iteration_1": {"valid_logloss": 0.9}}) == "held-out log loss 0.5000"


def test_verbose_comes_from_the_environment_so_stage_processes_inherit_it(monkeypatch):
    monkeypatch.setenv("STATEFARM_VERBOSE", "0")  # restored after the test, whatever set_verbose writes
    assert not verbose()
    set_verbose(True)
    assert verbose()


@pytest.fixture
def project(tmp_path):
    cfg = load_profile("smoke")
    write_params(cfg, tmp_path / "params.yaml")
    return tmp_path


def write_scores(root, table):
    folder = root / "reports/scores"
    folder.mkdir(parents=True)
    for name, figs in table.items():
        (folder / f"{name}.json").write_text(json.dumps(figs))


def test_results_table_lists_the_models_in_chain_order_with_cv_and_test_columns(project):
    figs = {"cv_logloss": 0.5, "cv_logloss_std": 0.01, "cv_acc": 0.8, "test_logloss": 0.45, "test_acc": 0.85}
    write_scores(project, {name: figs for name in ("calibrate", "member0", "head", "ensemble", "pseudo", "finetune")})
    assert [name for name, _ in score_rows(project / "reports/scores")] == \
        ["head", "finetune", "pseudo", "member0", "ensemble", "calibrate"]
    table = results_table(str(project)).splitlines()
    assert table[0].split() == ["model", "CV", "log", "loss", "+/-", "folds", "CV", "acc", "test", "log", "loss", "test", "acc"]
    assert table[1].split() == ["head", "0.5000", "0.0100", "0.8000", "0.4500", "0.8500"]
    assert table[-1] == "report: reports/report.html" or table[-1].endswith("reports/report.html")


def test_results_table_gives_the_submissions_estimate_and_interval_under_the_table(project):
    figs = {"cv_logloss": 0.5, "cv_acc": 0.8}
    write_scores(project, {"head": figs, "calibrate": figs | {"submission_estimate": 0.4612}})
    cfg = load_params(project / PARAMS_FILE)
    atomic_write_json(cfg.paths.stage_metrics_file("calibrate"), {
        "submission_estimate_method": "cv", "submission_logloss_estimate": 0.4612, "submission_logloss_low": 0.41,
        "submission_logloss_high": 0.53, "submission_interval_level": 0.8})
    table = results_table(str(project)).splitlines()
    assert table[2].split() == ["calibrate", "0.5000", "0.8000"]  # not a column: one stage has it
    assert table[3] == ("  the submission is estimated at 0.4612 (the CV log loss), 80% interval over the test's "
                        "drivers [0.4100, 0.5300]")


def test_headline_of_calibrate_adds_the_submissions_estimate_and_interval():
    figures = {"valid_logloss": 0.52, "valid_acc": 0.77, "submission_logloss_estimate": 0.47,
               "submission_logloss_low": 0.41, "submission_logloss_high": 0.55}
    assert headline(figures) == "held-out log loss 0.5200 (acc 0.770); the submission's estimate 0.4700 [0.4100, 0.5500]"
    assert headline({"calibrate": figures}) == headline(figures)  # as the flow's stage line passes it
    assert headline(figures | {"submission_logloss_low": None}) == "held-out log loss 0.5200 (acc 0.770)"


def test_results_table_before_any_scores_says_so(project):
    assert results_table(str(project)).startswith("no scores yet")


def test_stage_line_shows_how_time_and_the_headline(project):
    stages = project / "reports/stages"
    stages.mkdir(parents=True)
    (stages / "head@0.json").write_text(json.dumps({"valid_logloss": 0.6, "valid_acc": 0.7}))
    line = stage_line("head", ["head@0"], "ran", 3.25, str(project))
    assert line.split() == ["head", "ran", "3.2s", "held-out", "log", "loss", "0.6000", "(acc", "0.700)"]
    assert stage_line("split", [], "skipped", 0.4, str(project)).split() == ["split", "up", "to", "date", "0.4s"]


def test_an_orchestrated_stage_leaves_its_done_line_to_the_flow(monkeypatch):
    from pipeline.console import orchestrated

    monkeypatch.setenv("STATEFARM_VERBOSE", "0")
    monkeypatch.setenv("STATEFARM_ORCHESTRATED", "1")
    assert orchestrated()
    monkeypatch.setenv("STATEFARM_VERBOSE", "1")
    assert not orchestrated()  # verbose: every line
