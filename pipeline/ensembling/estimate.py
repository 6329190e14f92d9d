"""What the submission will score, estimated from out-of-fold (OOF) rows before Kaggle sees it, with
an interval for the drivers (groups) it will meet.

The submission averages the K fold models on test images; every OOF row was predicted by one fold
model that never saw its group. Candidates for the submission's log loss, all from the same files:

- ``cv``: the OOF log loss (calibrated, nested) as it is;
- ``cv_less_gain``: ``cv`` less the label-free fold averaging gain (``pipeline.outoffold.fold_averaging_gain``,
  KL of the averaged prediction from each fold model's, which assumes the average is calibrated);
- ``cv_less_half_gain``: half of that gain taken off (a shrunk correction);
- ``cv_plus_shift``: ``cv`` plus how much less confident the fold models are on the test images than on
  their own OOF rows (mean entropy, label-free): new drivers that look unlike the training ones raise it.

``calibrate.estimate`` picks the one printed; the default, ``cv_less_half_gain``, was the one over
17 runs with hidden labels (docs/results.md) that was neither optimistic nor pessimistic on average:
the KL gain overstates the real gain on sharp models, and single fold models do somewhat worse on the
test's drivers than on their own held-out ones, which no label-free figure sees.

The interval is a cluster bootstrap over groups: the CV mean's own uncertainty (which groups happened
to be labelled) and a fresh draw of the test's groups (how many: ``test_groups``, or the test rows over
the labelled rows per group), since a handful of unseen drivers decides most of a leaderboard score.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from pipeline.metrics import KAGGLE_EPS, normalise

# Each candidate as the console and report name it.
METHODS = {
    "cv": "the CV log loss",
    "cv_less_gain": "CV less the fold averaging gain",
    "cv_less_half_gain": "CV less half the fold averaging gain",
    "cv_plus_shift": "CV plus the test confidence shift",
}
BOOTSTRAP_DRAWS = 4000


def row_losses(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each row's Kaggle log loss (probabilities clipped at Kaggle's epsilon and renormalised)."""
    p = normalise(np.clip(normalise(np.asarray(probs, dtype=np.float64)), KAGGLE_EPS, 1.0))
    return -np.log(p[np.arange(len(labels)), np.asarray(labels)])


def mean_entropy(probs: np.ndarray) -> float:
    """The mean entropy of the rows (nats): the log loss a calibrated model expects on them."""
    p = normalise(np.clip(normalise(np.asarray(probs, dtype=np.float64)), KAGGLE_EPS, 1.0))
    return float(-(p * np.log(p)).sum(axis=1).mean())


def confidence_shift(oof: np.ndarray, oof_folds: np.ndarray, test_folds: np.ndarray, fold_ids: list[int]) -> float:
    """Mean over fold models of (entropy on the test images - entropy on its own OOF rows): positive
    when the test images are less familiar to the models than the held-out training drivers were."""
    shifts = [mean_entropy(test_folds[k]) - mean_entropy(oof[oof_folds == fold]) for k, fold in enumerate(fold_ids)]
    return float(np.mean(shifts))


def expected_test_groups(n_test: int, groups: np.ndarray) -> float:
    """How many groups ``n_test`` rows hold if test groups are as large as the labelled ones."""
    n_groups = len(np.unique(groups))
    return max(1.0, n_test * n_groups / len(groups))


def group_interval(losses: np.ndarray, groups: np.ndarray, test_groups: float, level: float,
                   draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> tuple[float, float]:
    """(low, high) offsets around the CV log loss for a test of ``test_groups`` unseen groups: quantiles
    of (test draw - CV draw), each a row-weighted mean over groups resampled with replacement. The first
    term is a new set of drivers, the second the CV's own luck in its drivers; their difference is how
    far the leaderboard can land from CV at this level."""
    keys, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=losses)
    counts = np.bincount(inverse).astype(np.float64)
    rng = np.random.default_rng(seed)
    n_groups, mean = len(keys), float(sums.sum() / counts.sum())

    def draw(size: int) -> np.ndarray:
        picks = rng.integers(0, n_groups, size=(draws, size))
        return sums[picks].sum(axis=1) / counts[picks].sum(axis=1)

    whole = int(np.floor(test_groups))
    tests = draw(max(whole, 1))
    deviation = (tests - mean) - (draw(n_groups) - mean)
    tail = (1 - level) / 2
    low, high = np.quantile(deviation, [tail, 1 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class SubmissionEstimate:
    """The submission's estimated log loss (``method``) with its interval, and every candidate."""

    method: str
    value: float
    low: float
    high: float
    level: float
    test_groups: float
    candidates: dict[str, float]
    spread: tuple[float, float]  # the interval's offsets around any candidate (group_interval)

    def centred_on(self, method: str) -> SubmissionEstimate:
        """The same candidates and interval, printed for another candidate; the interval stops at a log loss of 0."""
        value = self.candidates[method]
        return replace(self, method=method, value=value, low=max(value + self.spread[0], 0.0), high=value + self.spread[1])

    def as_figures(self) -> dict:
        return {"submission_estimate_method": self.method, "submission_logloss_estimate": round(self.value, 6),
                "submission_logloss_low": round(self.low, 6), "submission_logloss_high": round(self.high, 6),
                "submission_interval_level": self.level, "submission_test_groups": round(self.test_groups, 2),
                "submission_estimates": {k: round(v, 6) for k, v in self.candidates.items()}}


def estimate_candidates(cv: float, gain: float | None, shift: float | None) -> dict[str, float]:
    gain, shift = gain or 0.0, shift or 0.0
    return {"cv": cv, "cv_less_gain": cv - gain, "cv_less_half_gain": cv - gain / 2, "cv_plus_shift": cv + shift}


def estimate_submission(oof: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: np.ndarray,
                        test: np.ndarray, test_folds: np.ndarray | None, fold_ids: list[int], gain: float | None,
                        method: str, test_groups: float | None, level: float, seed: int = 0) -> SubmissionEstimate:
    """The candidates from the calibrated OOF rows (``oof``, each fold's by its own model) and the
    calibrated test predictions (``test``, the submission; ``test_folds``, each fold model's alone),
    the chosen ``method``'s value, and the group-bootstrap interval around it."""
    losses = row_losses(oof, labels)
    cv = float(losses.mean())
    shift = None if test_folds is None else confidence_shift(oof, folds, test_folds, fold_ids)
    candidates = estimate_candidates(cv, gain, shift)
    m = test_groups or expected_test_groups(len(test), groups)
    low, high = group_interval(losses, groups, m, level, seed=seed)
    return SubmissionEstimate(method, 0.0, 0.0, 0.0, level, m, candidates, (low, high)).centred_on(method)
