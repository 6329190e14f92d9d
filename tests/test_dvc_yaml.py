"""Keeps dvc.yaml honest (docs/design.md#one-dag): stages match the registry and the flow's
tasks, every pipeline module a stage imports is in its deps, every param exists in the schema."""

import re
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config
from pipeline.kernel.export import imported_project_modules
from pipeline.registry import STAGES

ROOT = Path(__file__).resolve().parent.parent
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def interpolate(text: str, params: dict = PARAMS) -> str:
    """DVC's ``${a.b}`` templating with params.yaml values (``${item}`` is left for foreach)."""
    def value(match: re.Match) -> str:
        node: object = params
        for key in match.group(1).split("."):
            node = node[key]  # type: ignore[index]
        return str(node)

    return re.sub(r"\$\{((?!item\b)[a-z_.]+)\}", value, text)


# foreach stages keep their definition under `do:`
DVC = {name: spec.get("do", spec)
       for name, spec in yaml.safe_load(interpolate((ROOT / "dvc.yaml").read_text()))["stages"].items()}
OUTPUT_ROOTS = {"data", "models", "reports", "submissions"}  # produced by stages, absent in a clean checkout
LAUNCHER = {"pipeline.cli", "pipeline.__main__"}  # the stage command itself, not what it computes with


def module_file(module: str) -> Path:
    path = ROOT / (module.replace(".", "/") + ".py")
    return path if path.exists() else ROOT / module.replace(".", "/") / "__init__.py"


def pipeline_imports(module: str) -> set[str]:
    """pipeline.* modules imported anywhere in ``module``'s source (lazy imports included)."""
    return imported_project_modules(module_file(module)) - LAUNCHER


def transitive_imports(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo.extend(pipeline_imports(current))
    return seen


def base_name(stage: str) -> str:
    return stage.split("@")[0]


def test_stages_match_registry_in_order():
    assert [base_name(s) for s in DVC] == list(STAGES)


def test_flow_has_one_task_per_stage_with_the_same_name():
    from flows.pipeline import stage_task

    assert [stage_task(s).name for s in STAGES] == list(STAGES)


@pytest.mark.parametrize("stage", list(DVC))
def test_command_runs_the_stage(stage):
    assert DVC[stage]["cmd"].startswith(f"python -m pipeline {base_name(stage)}")


def package_data(module: Path) -> set[str]:
    """The files of a ``templates/`` folder beside ``module``: read at run time, so deps like the module."""
    folder = module.parent / "templates"
    return {str(p.relative_to(ROOT)) for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else set()


@pytest.mark.parametrize("stage", list(DVC))
def test_every_imported_module_is_a_dep_and_no_dep_is_stale(stage):
    deps = set(DVC[stage].get("deps", []))
    files = {module_file(m) for m in transitive_imports(f"pipeline.stages.{base_name(stage)}")}
    needed = {str(f.relative_to(ROOT)) for f in files} | {d for f in files for d in package_data(f)}
    assert needed - deps == set(), f"{stage}: imports missing from deps"
    declared = {d for d in deps if d.startswith("pipeline/")}
    assert declared - needed == set(), f"{stage}: deps list modules (or templates) it does not import"
    for dep in deps:
        assert (ROOT / dep).exists() or dep.split("/")[0] in OUTPUT_ROOTS, f"{stage}: {dep} missing"


@pytest.mark.parametrize("stage", list(DVC))
def test_params_exist_in_the_schema(stage):
    for param in DVC[stage].get("params", []):
        keys = param.split(".") if isinstance(param, str) else []
        model = Config
        for key in keys:
            assert key in model.model_fields, f"{stage}: param {param} is not in the config schema"
            annotation = model.model_fields[key].annotation
            model = annotation if isinstance(annotation, type) and hasattr(annotation, "model_fields") else None
            if model is None:
                break


def test_params_yaml_has_every_param_section():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage in DVC.values():
        for param in stage.get("params", []):
            assert param == {"params.yaml": None} or param.split(".")[0] in params


def test_the_report_tracks_every_param_because_it_shows_the_whole_config():
    assert DVC["report"]["params"] == [{"params.yaml": None}]


RAW_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# matrix items (member@<m>-<fold>) are what separate workers run (docs/deploy.md)
FAN_OUT = [name for name, spec in RAW_STAGES.items() if "matrix" in spec or "foreach" in spec]
PER_FOLD = [name for name, spec in RAW_STAGES.items() if "foreach" in spec or "matrix" in spec]


def test_model_stages_run_once_per_fold():
    from pipeline.registry import PER_FOLD as registered

    assert sorted(PER_FOLD) == sorted(registered)
    for name in ("head", "finetune", "pseudo"):
        assert RAW_STAGES[name]["foreach"] == "${split.fold_ids}"
        assert "--fold ${item}" in RAW_STAGES[name]["do"]["cmd"]
    assert RAW_STAGES["member"]["matrix"] == {"member": "${ensemble.members}", "fold": "${split.fold_ids}"}
    # fold k's fine-tunes start from fold k's head, and its pseudo-labels come from fold k's fine-tune only
    assert "${paths.models}/head/fold${item}/head.pt" in RAW_STAGES["finetune"]["do"]["deps"]
    assert "${paths.predictions}/folds/finetune/${item}" in RAW_STAGES["pseudo"]["do"]["deps"]
    assert not [d for d in RAW_STAGES["pseudo"]["do"]["deps"] if "finetune" in d and "${item}" not in d]


@pytest.mark.parametrize("stage", FAN_OUT)
def test_fan_out_stages_can_be_restored_from_the_run_cache(stage):
    """Another checkout restores the fanned-out stages from DVC's run cache, which skips a stage with
    any persistent or uncached output."""
    for out in DVC[stage].get("outs", []) + DVC[stage].get("metrics", []):
        options = next(iter(out.values())) if isinstance(out, dict) else {}
        assert not options.get("persist", False), f"{stage}: {out} is persistent"
        assert options.get("cache", True), f"{stage}: {out} is not cached"


def out_path(out: str | dict) -> str:
    return out if isinstance(out, str) else next(iter(out))


def is_persistent(out: str | dict) -> bool:
    return isinstance(out, dict) and bool(next(iter(out.values())).get("persist"))


@pytest.mark.parametrize("stage", FAN_OUT)
def test_an_incomplete_params_yaml_stops_dvc_before_a_per_fold_stage(stage):
    """DVC deletes a per-fold stage's outputs before it notices a params section missing ("Parameters
    'head' are missing"). So each depends on an output of a guard: a stage that tracks all of params.yaml
    (DVC re-runs it on any change, before the per-fold stage), whose command refuses an incomplete file
    (every stage's does), and whose own outputs are persistent (kept when it fails)."""
    guards = [name for name, spec in DVC.items()
              if {"params.yaml": None} in spec.get("params", []) and all(map(is_persistent, spec["outs"]))]
    guard_outputs = {out_path(out) for name in guards for out in DVC[name]["outs"]}
    assert guard_outputs & set(DVC[stage]["deps"]), f"{stage}: no dependency on a params guard ({guards})"


def test_every_artifact_path_comes_from_params():
    """Paths are declared once (PathsConfig): dvc.yaml names no data/models/reports path literally,
    so `configure --set paths.raw=...` moves what DVC tracks instead of silently untracking it."""
    raw = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, spec in raw.items():
        spec = spec.get("do", spec)
        entries = spec.get("deps", []) + spec.get("outs", []) + spec.get("metrics", [])
        for entry in entries:
            path = entry if isinstance(entry, str) else next(iter(entry))
            if not path.startswith("pipeline/") and path != "${ingest.watch}":  # the user's source
                assert path.startswith("${paths."), f"{name}: {path} is not taken from params (paths.*)"


def test_dvc_itself_tracks_a_moved_artifact(tmp_path):
    """DVC resolves the templated paths from params.yaml: moving paths.raw moves ingest's output."""
    from dvc.repo import Repo

    from pipeline.config import load_profile, write_params

    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    write_params(load_profile("smoke", {"paths.raw": "elsewhere/raw"}), tmp_path / "params.yaml")
    Repo.init(str(tmp_path), no_scm=True)
    with Repo(str(tmp_path)) as repo:
        ingest = next(s for s in repo.index.stages if s.name == "ingest")
        assert "elsewhere/raw" in {str(out.def_path) for out in ingest.outs}


@pytest.mark.parametrize("stage", [s for s in DVC if s not in FAN_OUT])
def test_outputs_survive_a_failed_run(stage):
    """DVC deletes non-persistent outputs before running a stage, so a failure would lose the last good
    ones; stages write atomically instead, so every output but the fanned-out ones is persistent."""
    for out in DVC[stage].get("outs", []) + DVC[stage].get("metrics", []):
        options = next(iter(out.values())) if isinstance(out, dict) else {}
        assert options.get("persist", False), f"{stage}: {out} is not persistent"


def test_dvc_metrics_are_the_report_scores_only():
    """`dvc metrics show` reads the report's compact per-model scores and nothing else; each stage's
    figures file is a plain output (the flows and the report read it), so no figure shows twice."""
    metrics = {name: spec.get("do", spec).get("metrics", []) for name, spec in RAW_STAGES.items()}
    assert {name: entries for name, entries in metrics.items() if entries} == {
        "report": [{"${paths.scores}": {"persist": True}}]}  # cached: `dvc metrics diff` loads any commit's
    for name, spec in RAW_STAGES.items():
        if name == "report":
            continue
        outs = [out if isinstance(out, str) else next(iter(out)) for out in spec.get("do", spec)["outs"]]
        assert any(out.startswith(f"${{paths.stage_metrics}}/{name}") for out in outs), f"{name}: figures not an output"


TOP_PLOTS = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]


def test_plots_read_only_the_report_plot_data_from_params_paths():
    for entry in TOP_PLOTS:
        plot_id, props = next(iter(entry.items()))
        files = list(props["y"]) if isinstance(props.get("y"), dict) else [plot_id]
        assert files and all(f.startswith("${paths.plots}/") for f in files), plot_id


def test_dvc_resolves_the_plot_paths_from_params(tmp_path):
    """Top-level plots are templated too: moving paths.plots moves what `dvc plots show` reads."""
    from dvc.repo import Repo

    from pipeline.config import load_profile, write_params

    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    write_params(load_profile("smoke", {"paths.plots": "elsewhere/plots"}), tmp_path / "params.yaml")
    Repo.init(str(tmp_path), no_scm=True)
    with Repo(str(tmp_path)) as repo:
        resolved = repo.plots.show()["workspace"]["definitions"]["data"]["dvc.yaml"]["data"]  # no data yet: errors only
    ids = list(resolved)
    files = {f for props in resolved.values() if isinstance(props.get("y"), dict) for f in props["y"]}
    assert "elsewhere/plots/learning" in ids and "elsewhere/plots/learning_rate" in ids
    assert files == {"elsewhere/plots/confusion.csv", "elsewhere/plots/calibration.csv"}


def test_a_dir_or_zip_source_is_an_ingest_dependency(tmp_path):
    """DVC hashes a `dir` source's files (ingest.watch), so a changed image re-runs ingest; sources without
    local files (synthetic, kaggle) watch the ingest module instead, which always exists."""
    from pipeline.config import load_profile

    assert "${ingest.watch}" in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["ingest"]["deps"]
    assert load_profile("smoke").ingest.watch == "pipeline/stages/ingest.py"
    assert load_profile("smoke", ["ingest.source=dir", f"ingest.path={tmp_path}"]).ingest.watch == str(tmp_path)
    zipped = load_profile("smoke", ["ingest.source=zip", "ingest.path=~/comp.zip"]).ingest.watch
    assert zipped == str(Path.home() / "comp.zip")
