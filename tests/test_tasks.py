"""flows/tasks.py on a toy DVC project: a failed stage whose outputs are not persistent (DVC deletes
them before running it) gets its last good outputs checked out again, replacing what the failed run
half-wrote there, and the error says so."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flows.tasks import StageFailed, reproduce

STAGE = """stages:
  make:
    cmd: {python} -c "import os, sys, yaml; p = yaml.safe_load(open('params.yaml')); os.makedirs('out', exist_ok=True); open('out/events.log', 'w').write('half') if p['fail'] else None; sys.exit(p['fail']) if p['fail'] else None; open('out/model.txt', 'w').write(str(p['value']))"
    params: [value, fail]
    outs: [out]
"""


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    from dvc.repo import Repo

    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    (tmp_path / "dvc.yaml").write_text(STAGE.format(python=sys.executable))
    (tmp_path / "params.yaml").write_text("value: 1\nfail: 0\n")
    Repo.init(str(tmp_path), no_scm=True)
    return tmp_path


def test_a_failed_stage_gets_its_last_good_outputs_back(project):
    names, how = reproduce("make", str(project))
    assert (names, how) == (["make"], "ran")
    assert (project / "out/model.txt").read_text() == "1"

    (project / "params.yaml").write_text("value: 2\nfail: 3\n")
    with pytest.raises(StageFailed, match="last good outputs were checked out again") as failed:
        reproduce("make", str(project))
    assert failed.value.stage == "make"
    assert (project / "out/model.txt").read_text() == "1"  # DVC had deleted it before running the command
    assert not (project / "out/events.log").exists()  # what the failed run half-wrote is gone, not kept

    (project / "params.yaml").write_text("value: 1\nfail: 0\n")
    assert reproduce("make", str(project)) == ([], "skipped")  # back to the recorded state


def test_an_unchanged_stage_is_skipped(project):
    reproduce("make", str(project))
    assert reproduce("make", str(project)) == ([], "skipped")
