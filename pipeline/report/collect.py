"""What the report reads besides predictions: each stage's figures in DAG order, the checkout's git
revision, and how the models were validated."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.competition import Competition, read_competition
from pipeline.config import Config, item_stage
from pipeline.errors import StageError
from pipeline.metrics import collect_stage_metrics
from pipeline.registry import PER_FOLD, STAGES


def stage_order(fold_ids: list[int], members: list[int]) -> list[str]:
    """The current DAG in order, each stage followed by its per-fold items: ``head``, ``head@0``,
    ``head@1`` ...; ``member``, ``member@0-0``, ``member@0-1``, ``member@1-0`` ... (member, then fold)."""
    order: list[str] = []
    for stage in STAGES:
        order.append(stage)
        if stage == "member":
            order += [item_stage(stage, m, k) for m in members for k in fold_ids]
        elif stage in PER_FOLD:
            order += [item_stage(stage, k) for k in fold_ids]
    return order


def collect_metrics(folder: Path, fold_ids: list[int], members: list[int]) -> dict[str, dict]:
    """Figures of the stages in the current DAG only: a file left by a stage, fold or member that has
    since been removed from the config is stale and must not reach metrics.json."""
    return collect_stage_metrics(folder, stage_order(fold_ids, members))


@dataclass(frozen=True)
class Revision:
    """The checkout's commit and the tracked files changed since; without a commit, why (``missing``)."""

    sha: str | None
    changed: list[str] = field(default_factory=list)
    missing: str = ""


def git_revision(root: Path, outputs: str = "reports/") -> Revision:
    """The commit and the tracked files changed since (``dvc exp run -S`` edits params.yaml), outside
    ``outputs`` (the figures files the stages rewrite); never an error: the stage also runs outside git."""
    def git(*args: str) -> str | None:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=False)
        return done.stdout if done.returncode == 0 else None

    try:
        sha = (git("rev-parse", "--short", "HEAD") or "").strip()
        changed = git("status", "--porcelain", "--untracked-files=no") if sha else None
    except (OSError, subprocess.SubprocessError):
        return Revision(None, missing="unknown (git is not available)")
    if not sha:
        return Revision(None, missing="none (not a git checkout, or no commit yet)")
    files = [line[3:] for line in (changed or "").splitlines() if line.strip() and not line[3:].startswith(outputs)]
    return Revision(sha, files)


def read_competition_or_none(cfg: Config) -> Competition | None:
    try:
        return read_competition(cfg.paths.path("raw"))
    except StageError:
        return None


def validation_kind(cfg: Config, competition: Competition | None) -> str:
    """What validates the models: K-fold cross-validation (grouped, or over images without groups), or
    one held-out split (whole groups, or single images)."""
    if cfg.split.validation == "cv":
        kind = f"{len(cfg.split.fold_ids)}-fold cross-validation"
        if competition is None:
            return kind
        if competition.has_groups:
            return f"{kind} grouped by {competition.group_name}"
        return f"{kind} over images (this competition has no groups)"
    if competition is None:
        return "held out"
    if competition.has_groups:
        return f"whole held-out groups of {competition.group_name}"
    return "held-out images: this competition has no groups, so validation is per image"
