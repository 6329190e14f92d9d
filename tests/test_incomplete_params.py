"""An incomplete params.yaml (a section or a key deleted by hand) is refused on every path, naming the
configure command that regenerates it, and costs no stage its outputs: DVC deletes a per-fold stage's
non-persistent outputs before it notices a params section missing, so `dvc repro` must stop upstream of
them (the split stage tracks the whole file), and the flow must not start DVC at all."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import tasks
from pipeline import cli
from pipeline.config import load_profile, write_params

REGENERATE = "python -m pipeline configure --profile smoke"
# What the per-fold stages wrote: DVC deletes these (not persistent) before it re-runs such a stage.
PER_FOLD_OUTPUTS = ("models/head", "models/finetune", "models/pseudo", "data/predictions/folds")


def drop_param(params: Path, key: str) -> None:
    """Delete a section (``head``) or a key (``head.max_epochs``) from a resolved params.yaml."""
    data = yaml.safe_load(params.read_text())
    *parents, last = key.split(".")
    node = data
    for parent in parents:
        node = node[parent]
    del node[last]
    params.write_text(yaml.safe_dump(data, sort_keys=False))


def per_fold_digests(root: Path) -> dict[str, str]:
    files = [p for rel in PER_FOLD_OUTPUTS for p in (root / rel).rglob("*") if p.is_file()]
    files += list((root / "reports/stages").glob("*@*.json"))
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


@pytest.mark.parametrize("missing", ["head", "finetune.lr"])
def test_the_cli_refuses_an_incomplete_params_yaml(tmp_path, capsys, missing):
    params = tmp_path / "params.yaml"
    write_params(load_profile("smoke").at(tmp_path), params)
    drop_param(params, missing)
    assert cli.main(["head", "--fold", "0", "--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert f"missing {missing}" in err and REGENERATE in err


@pytest.mark.parametrize("missing", ["head", "finetune.lr"])
def test_the_flow_refuses_an_incomplete_params_yaml_before_starting_dvc(tmp_path, monkeypatch, missing):
    write_params(load_profile("smoke"), tmp_path / "params.yaml")
    drop_param(tmp_path / "params.yaml", missing)

    def dvc_started(*args, **kwargs):
        raise AssertionError("DVC was started with an incomplete params.yaml")

    monkeypatch.setattr(tasks, "reproduce", dvc_started)
    with pytest.raises(tasks.StageFailed) as failed:
        tasks.run_dvc_stage.fn("head@0", str(tmp_path))
    assert failed.value.stage == "head@0"
    assert f"missing {missing}" in failed.value.reason and REGENERATE in failed.value.reason


@pytest.mark.slow
@pytest.mark.parametrize("missing", ["head", "finetune.lr"])
def test_dvc_repro_keeps_every_per_fold_output_when_params_yaml_is_incomplete(smoke_run, tmp_path, missing):
    """`dvc repro head@0` with the `head:` section deleted used to fail with DVC's "Parameters 'head' are
    missing" after deleting models/head/fold0 and its predictions."""
    from conftest import copy_of
    from test_flow import sh, tool_env

    root = copy_of(smoke_run, tmp_path / "repo").root
    before = per_fold_digests(root)
    assert any(name.startswith("models/head/fold0/") for name in before)
    complete = (root / "params.yaml").read_bytes()
    drop_param(root / "params.yaml", missing)
    for target in ("head@0", "finetune@1", ""):
        done = subprocess.run([sys.executable, "-m", "dvc", "repro", *([target] if target else [])], cwd=root,
                              env=tool_env(), capture_output=True, text=True)
        assert done.returncode != 0, target
        output = done.stdout + done.stderr
        assert f"missing {missing}" in output and REGENERATE in output, output
        assert per_fold_digests(root) == before, target
    (root / "params.yaml").write_bytes(complete)
    assert "Running stage" not in sh([sys.executable, "-m", "dvc", "repro"], root)  # nothing lost, nothing stale
