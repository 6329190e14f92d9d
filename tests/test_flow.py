"""End to end on a copy of the repository: `dvc repro` from a fresh checkout runs every stage (the
session's smoke run), a second one runs none, and the Prefect flow (real local server) drives the same
stages through DVC, on both competition layouts."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from checkout import copy_project

ROOT = Path(__file__).resolve().parent.parent


def tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def sh(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, env=tool_env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def fresh_checkout(dst: Path, *configure: str) -> Path:
    """A copy of the working tree (what CI and a new user start from), configured."""
    copy_project(dst)
    sh(["git", "init", "-q"], dst)
    sh([sys.executable, "-m", "pipeline", "configure", *configure], dst)
    return dst


@pytest.fixture(scope="module")
def clone(smoke_run, tmp_path_factory) -> Path:
    """A copy of the session's smoke run checkout (State Farm layout, every stage run once by `dvc repro`
    from a fresh checkout); the tests here edit and commit it, so not the shared one."""
    from conftest import copy_of

    return copy_of(smoke_run, tmp_path_factory.mktemp("clone") / "repo").root


def assert_submission_matches_the_sample(root: Path, sample: str) -> None:
    import csv

    with open(root / "submissions/submission.csv") as f, open(root / "data/raw" / sample) as g:
        header, rows = next(csv.reader(f)), list(csv.reader(f))
        sample_header, sample_rows = next(csv.reader(g)), list(csv.reader(g))
    assert header == sample_header
    assert sorted(r[0] for r in rows) == sorted(r[0] for r in sample_rows)


@pytest.mark.slow
def test_dvc_repro_runs_every_stage_then_nothing(clone, smoke_run):
    for stage in ("ingest", "split", "sample", "features", "head@0", "finetune@1", "pseudo@0", "ensemble", "report"):
        assert f"Running stage '{stage}'" in smoke_run.log
    assert (clone / "data/split.csv").exists() and (clone / "reports/metrics.json").exists()
    second = sh([sys.executable, "-m", "dvc", "repro"], clone)
    assert "Running stage" not in second
    assert_dvc_views_load_and_are_compact(clone)
    # A one-line edit to a stage module invalidates that stage only (stages never import stages);
    # a per-fold stage's every fold.
    for stage, items in (("features", {"features"}), ("head", {"head@0", "head@1"}), ("finetune", {"finetune@0", "finetune@1"})):
        module = clone / "pipeline" / "stages" / f"{stage}.py"
        original = module.read_text()
        module.write_text(original + "# a cosmetic edit\n")
        try:
            assert changed_stages(clone) == items
        finally:
            module.write_text(original)
    assert changed_stages(clone) == set()
    assert_submission_matches_the_sample(clone, "sample_submission.csv")
    assert_a_failed_stage_keeps_its_outputs(clone)


@pytest.mark.slow
def test_after_a_run_git_sees_only_dvc_lock(smoke_run):
    """Every output is git-ignored (and DVC writes no .gitignore files of its own): what is left for
    `git status` beyond the source is the lock file a user commits."""
    from checkout import project_files

    seen = sh(["git", "ls-files", "-z", "--others", "--exclude-standard"], smoke_run.root).split("\0")
    assert set(filter(None, seen)) - set(project_files()) == {"dvc.lock"}


def dvc_json(args: list[str], cwd: Path) -> dict:
    """A DVC command's --json output (stdout only: progress and warnings go to stderr)."""
    import json

    done = subprocess.run([sys.executable, "-m", "dvc", *args, "--json"], cwd=cwd, env=tool_env(), capture_output=True,
                          text=True)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


def assert_dvc_views_load_and_are_compact(clone: Path) -> None:
    """What a Kaggler types after a run, once it is committed (docs/experiments.md, "DVC views"): `dvc metrics show` is a
    model-by-score table that fits a 120-column terminal; `dvc metrics diff` loads the commit's scores (from
    the DVC cache); `dvc plots show` and `dvc plots diff` load every plot; `dvc exp show` with the docs'
    column selection keeps the submission's CV log loss and the changed params only."""
    from pipeline.config import load_params

    sh(["git", "add", "-A"], clone)
    sh(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "a run"], clone)
    rows = [*load_params(clone / "params.yaml").ensemble.models(), "ensemble", "calibrate"]

    lines = [line.rstrip() for line in sh([sys.executable, "-m", "dvc", "metrics", "show"], clone).splitlines() if line.strip()]
    assert lines[0].split() == ["Path", "cv_acc", "cv_logloss", "cv_logloss_std", "submission_estimate", "test_acc",
                                "test_logloss"]  # the estimate: calibrate's row only
    assert sorted(line.split()[0] for line in lines[1:]) == sorted(f"reports/scores/{m}.json" for m in rows)
    assert max(map(len, lines)) <= 120, "\n".join(lines)

    diff = sh([sys.executable, "-m", "dvc", "metrics", "diff", "--all"], clone)
    assert "failed to load" not in diff and "reports/scores/calibrate.json  cv_logloss" in diff

    for args in (["plots", "show"], ["plots", "diff", "HEAD"]):
        plots = dvc_json(args, clone)
        assert not plots.get("errors"), plots["errors"]
        expected = {f"reports/plots/learning/{m}.csv" for m in rows[:-2]} | {
            "Confusion matrix (best out-of-fold predictions)", "Calibration (best out-of-fold predictions)"}
        assert expected <= set(plots["data"]), sorted(plots["data"])
        assert all(plot["type"] == "vega" for renders in plots["data"].values() for plot in renders)

    selection = ["--only-changed", "--drop", ".*/|models$|Created", "--keep", "reports/scores/calibrate.json:cv_logloss"]
    table = sh([sys.executable, "-m", "dvc", "exp", "show", "--csv", *selection], clone).splitlines()
    assert set(table[0].split(",")) - {"Experiment", "rev", "typ", "parent"} == {"reports/scores/calibrate.json:cv_logloss"}
    shown = sh([sys.executable, "-m", "dvc", "exp", "show", "--no-pager", *selection], clone)
    assert "cv_logloss" in shown and max(map(len, shown.splitlines())) <= 120


def tree_digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_a_failed_stage_keeps_its_outputs(clone: Path) -> None:
    """DVC deletes a stage's outputs before running it; with persistent outputs written atomically,
    a failed `dvc repro ingest` (a 0-byte JPEG in the source) leaves the last good data/raw in place."""
    bad = clone.parent / "bad_source"
    shutil.copytree(clone / "data/raw", bad)
    next((bad / "imgs/train/c0").iterdir()).write_bytes(b"")
    before = tree_digest(clone / "data/raw")
    sh([sys.executable, "-m", "pipeline", "configure", "--profile", "smoke", "--set", "ingest.source=dir",
        "--set", f"ingest.path={bad}"], clone)
    failed = subprocess.run([sys.executable, "-m", "dvc", "repro", "ingest"], cwd=clone, env=tool_env(),
                            capture_output=True, text=True)
    assert failed.returncode != 0
    assert "empty or truncated file" in failed.stderr and "previous outputs are left in place" in failed.stderr
    assert tree_digest(clone / "data/raw") == before
    sh([sys.executable, "-m", "pipeline", "configure", "--profile", "smoke"], clone)
    assert changed_stages(clone) == set()  # back to the last good state: nothing to re-run
    assert_a_changed_source_image_reruns_ingest(clone, bad)


def assert_a_changed_source_image_reruns_ingest(clone: Path, source: Path) -> None:
    """DVC hashes a `dir` source (ingest.watch): after one image in it changes, ingest is stale and its
    re-run copies the new bytes (it used to say "didn't change, skipping")."""
    images = sorted((source / "imgs/train/c0").iterdir(), key=lambda image: image.stat().st_size)
    images[0].write_bytes(images[-1].read_bytes())  # repair the 0-byte JPEG: a valid source
    configure_dir = [sys.executable, "-m", "pipeline", "configure", "--profile", "smoke", "--set",
                     "ingest.source=dir", "--set", f"ingest.path={source}"]
    sh(configure_dir, clone)
    sh([sys.executable, "-m", "dvc", "repro", "--single-item", "ingest"], clone)
    assert "ingest" not in changed_stages(clone)
    images[1].write_bytes(images[2].read_bytes())
    assert "ingest" in changed_stages(clone)
    sh([sys.executable, "-m", "dvc", "repro", "--single-item", "ingest"], clone)
    assert (clone / "data/raw/imgs/train/c0" / images[1].name).read_bytes() == images[2].read_bytes()
    sh([sys.executable, "-m", "pipeline", "configure", "--profile", "smoke"], clone)
    sh([sys.executable, "-m", "dvc", "repro", "--single-item", "ingest"], clone)  # the synthetic data again


def changed_stages(clone: Path) -> set[str]:
    """Stages `dvc status` reports as changed."""
    import json

    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=clone, env=tool_env(),
                         capture_output=True, text=True, check=True).stdout
    return set(json.loads(out or "{}"))


@pytest.mark.slow
def test_prefect_flow_runs_the_stages_through_dvc(clone, tmp_path, monkeypatch):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline_flow
    from flows.retrain import retrain_flow

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    from conftest import csv_smoke_overrides

    override = {"ensemble.hill_climb_steps": 25}  # stale: ensemble and what follows it
    with prefect_test_harness(server_startup_timeout=120):
        metrics = pipeline_flow(profile="smoke", overrides=override, root=str(clone))
        # The scheduled retrain on an unchanged checkout: nothing upstream of a (dry-run) submit re-runs.
        retrain = retrain_flow(profile="smoke", overrides=override, root=str(clone))
        # The second embedded competition (labels CSV, flat folders, 5 string-named classes, no groups)
        # through the same flow, from a fresh checkout: every stage, unchanged code.
        csv_root = fresh_checkout(tmp_path / "csv", "--profile", "smoke")
        # One member: the layout is what this run checks; the member matrix runs on the State Farm layout.
        csv = {**csv_smoke_overrides(), "ensemble.members": [0]}
        csv_metrics = pipeline_flow(profile="smoke", overrides=csv, root=str(csv_root))
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    assert lock["ensemble"]["params"]["params.yaml"]["ensemble"]["hill_climb_steps"] == 25  # reached the stage
    assert changed_stages(clone) == set()
    assert set(metrics) >= {"ingest", "split", "sample", "ensemble", "calibrate"}
    assert csv_metrics["ingest"]["n_classes"] == 5 and "n_groups" not in csv_metrics["ingest"]
    assert_submission_matches_the_sample(csv_root, "sample_submission.csv")
    header = (csv_root / "submissions/submission.csv").read_text().splitlines()[0]
    assert header.startswith("image_id,") and len(header.split(",")) == 6
    split = (csv_root / "data/split.csv").read_text().splitlines()
    assert all(line.split(",")[0] == line.split(",")[2] for line in split[1:])  # per-image groups
    assert (clone / ".dvc-remote").is_dir()  # dvc push after the run
    assert retrain["submitted"] is False  # no Kaggle credentials here: at most a dry run
    assert not set(retrain["stages_run"]) - {"submit", "report"}, retrain


# ---------------------------------------------------------------------------- flow wiring (fast)


def test_run_parameters_validate_overrides_through_the_config_naming_the_key():
    from pydantic import ValidationError

    from flows.params import RunParameters
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=r"head\.no_such_key: unknown key"):
        RunParameters(profile="smoke", overrides={"head.no_such_key": 1}).config()
    with pytest.raises(ValidationError):
        RunParameters(profile="no-such-profile")
    # The submit switch is the one source of submit.enabled.
    assert RunParameters(profile="smoke", submit=True).config().submit.enabled is True
    assert RunParameters(profile="smoke", overrides={"submit": {"enabled": True}}).config().submit.enabled is False
    assert RunParameters(profile="smoke", overrides={"sample.n_train": 25}).config().sample.n_train == 25


def test_flows_have_typed_parameters_for_the_ui_form():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline_flow
    from flows.retrain import retrain_flow
    from flows.submit import submit_flow

    for flow in (pipeline_flow, retrain_flow, submit_flow):
        schema = parameter_schema(flow).model_dump()
        props = schema["properties"]
        profile = props["profile"]
        enum = profile.get("enum") or schema["definitions"][profile["$ref"].rsplit("/", 1)[-1]]["enum"]
        assert enum == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")), flow.name
        assert {"demo", "demo-csv", "statefarm", "smoke"} <= set(enum)
        assert all(p.get("description") for p in props.values()), f"{flow.name}: undocumented parameter"


def test_retries_only_on_transient_stages():
    from flows.tasks import stage_retries, stage_task
    from pipeline.config import load_profile

    synthetic = load_profile("smoke")
    kaggle = load_profile("statefarm")
    assert stage_retries("ingest", kaggle) > 0 and stage_retries("submit", synthetic) > 0
    assert stage_retries("ingest", synthetic) == 0
    assert all(stage_retries(s, kaggle) == 0 for s in STAGES_WITHOUT_RETRIES)
    task = stage_task("submit", retries=1)
    assert (task.name, task.retries) == ("submit", 1)


STAGES_WITHOUT_RETRIES = ("split", "sample", "features", "head", "finetune", "ensemble", "calibrate", "report")


def test_headline_is_the_last_stage_in_dag_order_with_a_validation_log_loss():
    from flows.submission import should_submit
    from flows.tasks import headline
    from pipeline.registry import STAGES

    first, second = list(STAGES)[1:3]
    metrics = {second: {"valid_logloss": 0.5}, first: {"valid_logloss": 0.9, "valid_acc": 0.7}, "ingest": {"n": 3}}
    assert headline(metrics) == (second, 0.5)
    assert headline({"ingest": {"n": 3}}) is None
    assert should_submit(metrics, None)[0] is True
    assert should_submit(metrics, {"valid_logloss": 0.6})[0] is True
    assert should_submit(metrics, {"valid_logloss": 0.5})[0] is False
    assert should_submit(metrics, {"valid_logloss": 0.52}, min_improvement=0.05)[0] is False
    assert should_submit({"ingest": {}}, None)[0] is False
    from flows.tasks import metrics_table

    table = metrics_table(metrics)
    assert [row["stage"] for row in table] == ["ingest", first, second]
    assert table[1]["valid_logloss"] == 0.9 and table[0]["valid_logloss"] == ""


def test_the_retrain_compares_like_with_like_and_names_the_figure():
    from flows.submission import compared_figure, should_submit

    metrics = {"calibrate": {"valid_logloss": 0.5, "validation": "cv", "n_valid": 549,
                             "submission_logloss_estimate": 0.5, "submission_estimate_method": "cv"}}
    last = compared_figure(metrics) | {"valid_logloss": 0.52}
    submit, why = should_submit(metrics, last)
    assert submit and why == "improved: calibrate's valid_logloss 0.50000 (cv, 549 labelled rows) < 0.52000 (last submission, same figure)"
    submit, why = should_submit(metrics, last | {"valid_logloss": 0.49})
    assert not submit and "did not improve on the last submission's 0.49000 (same figure)" in why
    # new labelled rows (or another validation mode): the figures are not comparable, and the reason says so
    submit, why = should_submit(metrics, last | {"valid_logloss": 0.45, "n_valid": 500})
    assert submit and "not comparable with the last submission's calibrate's valid_logloss 0.45000 (cv, 500 labelled rows)" in why
    submit, why = should_submit(metrics, last | {"valid_logloss": 0.45, "validation": "holdout"})
    assert submit and "(another validation)" in why


def test_stage_failure_keeps_the_last_stderr_lines_and_names_the_stage():
    import pickle

    from flows.tasks import StageFailed, stderr_tail

    with stderr_tail(lines=3) as tail:
        subprocess.run([sys.executable, "-c", "import sys\nfor i in range(10): print('line', i, file=sys.stderr)"],
                       check=True)
    assert list(tail) == ["line 7", "line 8", "line 9"]
    err = pickle.loads(pickle.dumps(StageFailed("split", "failed to reproduce 'split'", tail)))
    assert str(err).startswith("stage 'split' failed: failed to reproduce 'split'") and "line 9" in str(err)


def test_prefect_yaml_deploys_every_flow_on_the_process_pool():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in spec["deployments"]}
    names = {name: load_flow_from_entrypoint(d["entrypoint"]).name for name, d in deployments.items()}
    assert names == {"full": "statefarm-pipeline", "weekly": "statefarm-retrain", "submit": "statefarm-submit",
                     "stages": "statefarm-stages"}
    assert all(d["work_pool"]["name"] == "statefarm-pool" for d in deployments.values())
    assert deployments["weekly"]["schedules"] == [{"cron": "0 3 * * 1", "timezone": "UTC", "active": True}]
    step = spec["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "{{ $PWD }}"
