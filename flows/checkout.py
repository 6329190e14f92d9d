"""A checkout's identity for scale-out: which commit it is at, whether its tracked code differs from
that commit, and which resolved config its params.yaml holds. The coordinator sends its own; a worker
refuses to run a stage when its checkout differs (its run-cache entries would not match, and the
coordinator would silently re-run the stage or, worse, mix results of two code versions).

Also the pull step of the `statefarm-stages` deployment: a worker's flow runs in the worker's own
checkout (``STATEFARM_CHECKOUT``), not in the directory the deployment was registered from.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

from pipeline.config import PARAMS_FILE

CHECKOUT_ENV = "STATEFARM_CHECKOUT"  # the worker's checkout (scripts/start_worker.sh sets it)
WORKER_ENV = "STATEFARM_WORKER"  # the worker's name in logs and errors
# Files every run rewrites: not part of the code identity (params.yaml is compared on its own).
RUN_STATE_FILES = (PARAMS_FILE, "dvc.lock")


class CheckoutMismatch(RuntimeError):
    """A worker's checkout is not the coordinator's: refused before any stage runs."""


def enter_worker_checkout(default: str | None = None) -> dict[str, str]:
    """Prefect pull step: work in ``$STATEFARM_CHECKOUT`` (the worker's own clone), else in
    ``default`` (the checkout the deployment was registered from), else where the run started."""
    directory = os.environ.get(CHECKOUT_ENV) or default or os.getcwd()
    os.chdir(directory)
    return {"directory": directory}


def worker_name() -> str:
    return os.environ.get(WORKER_ENV) or f"{socket.gethostname()}:{os.getcwd()}"


def git(root: str | Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise CheckoutMismatch(f"{Path(root).resolve()} is not a git checkout (git {' '.join(args)}: "
                               f"{done.stderr.strip() or done.returncode}); scale-out needs the same commit everywhere")
    return done.stdout


def params_digest(root: str | Path) -> str:
    path = Path(root) / PARAMS_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "none"


def checkout_state(root: str | Path) -> dict[str, Any]:
    """commit, a digest of uncommitted changes to tracked files (params.yaml and dvc.lock excluded),
    and the params.yaml digest."""
    excluded = [f":(exclude){name}" for name in RUN_STATE_FILES]
    diff = git(root, "diff", "HEAD", "--", ".", *excluded)
    return {
        "commit": git(root, "rev-parse", "HEAD").strip(),
        "uncommitted": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else "",
        "params": params_digest(root),
    }


def check_same_checkout(root: str | Path, expected: dict[str, Any], worker: str) -> None:
    """Raise ``CheckoutMismatch`` naming the worker and what differs."""
    actual = checkout_state(root)
    wrong = [f"{key} {actual.get(key) or 'clean'} (coordinator: {expected.get(key) or 'clean'})"
             for key in ("commit", "uncommitted", "params") if actual.get(key) != expected.get(key)]
    if wrong:
        raise CheckoutMismatch(
            f"worker {worker} refuses to run: its checkout {Path(root).resolve()} differs from the coordinator's: "
            + "; ".join(wrong) + ". Check out the coordinator's commit there (scripts/start_worker.sh --commit ...)")
