"""Test repositories are built from the project's source, never from a run's outputs: the files git
tracks (as they are in the working tree, so an uncommitted edit is tested) and new, not yet tracked
files under the source folders. A `make demo` in this checkout leaves outputs (reports, dvc.lock, DVC's
.gitignore files) that would otherwise be copied, committed and then rewritten by the test's own run."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE_FOLDERS = ("pipeline", "flows", "tests", "benchmarks", "scripts", "configs", "docs", "deploy")
# Tracked files a run rewrites (configure writes params.yaml): copied as committed.
RUN_WRITTEN = ("params.yaml",)


def git_files(*options: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z", *options], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [name for name in out.split("\0") if name]


def project_files() -> list[str]:
    """The tracked files that exist, plus untracked, not ignored files under ``SOURCE_FOLDERS``."""
    new = [f for f in git_files("--others", "--exclude-standard") if f.split("/", 1)[0] in SOURCE_FOLDERS]
    return sorted(f for f in {*git_files("--cached"), *new} if (ROOT / f).is_file())


def committed_bytes(rel: str) -> bytes:
    return subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=ROOT, capture_output=True, check=True).stdout


def copy_project(dst: Path) -> Path:
    """A fresh checkout of the project's source at ``dst`` (no .git)."""
    for rel in project_files():
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel in RUN_WRITTEN:
            (dst / rel).write_bytes(committed_bytes(rel))
        else:
            shutil.copy2(ROOT / rel, dst / rel)
    return dst
