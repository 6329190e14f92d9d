"""A worker refuses to run a stage when its checkout is not the coordinator's (flows/checkout.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from flows.checkout import CheckoutMismatch, check_same_checkout, checkout_state, enter_worker_checkout


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.fixture
def repo(tmp_path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "code.py").write_text("x = 1\n")
    (root / "params.yaml").write_text("a: 1\n")
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "first")
    return root


def test_the_same_checkout_passes_and_run_state_files_do_not_count(repo):
    expected = checkout_state(repo)
    (repo / "dvc.lock").write_text("schema: '2.0'\n")  # every run rewrites it
    check_same_checkout(repo, expected, "w1")


@pytest.mark.parametrize("change, named", [
    (lambda r: git(r, "commit", "-q", "--allow-empty", "-m", "other"), "commit"),
    (lambda r: (r / "code.py").write_text("x = 2\n"), "uncommitted"),
    (lambda r: (r / "params.yaml").write_text("a: 2\n"), "params"),
])
def test_another_commit_uncommitted_code_or_params_is_refused_naming_the_worker(repo, change, named):
    expected = checkout_state(repo)
    change(repo)
    with pytest.raises(CheckoutMismatch, match=rf"worker w2 refuses to run: .*{named}"):
        check_same_checkout(repo, expected, "w2")


def test_a_folder_that_is_not_a_git_checkout_is_refused(tmp_path):
    with pytest.raises(CheckoutMismatch, match="not a git checkout"):
        checkout_state(tmp_path)


def test_the_pull_step_enters_the_workers_own_checkout(tmp_path, monkeypatch):
    mine, registered = tmp_path / "mine", tmp_path / "registered"
    mine.mkdir(), registered.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("STATEFARM_CHECKOUT", str(mine))
    assert enter_worker_checkout(default=str(registered)) == {"directory": str(mine)}
    assert Path.cwd() == mine
    monkeypatch.delenv("STATEFARM_CHECKOUT")
    enter_worker_checkout(default=str(registered))
    assert Path.cwd() == registered
