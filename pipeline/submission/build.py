"""The submission file: built from test predictions in the sample submission's format and validated
against ``sample_submission.csv`` before it replaces anything. Used by the ``submit`` stage (from the
calibrated predictions file) and by the code-competition notebook (``pipeline.kernel``, from the
predictions it computes on Kaggle), so both write the same bytes for the same probabilities.

Validation: same ids, each once; header exactly the sample submission's; finite values in (0, 1];
rows summing to 1. The file is written to a temp sibling, validated, and only then renamed into
place, so a refused file never replaces a previous good one and nothing unvalidated is uploaded.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import BadInputError, StageError
from pipeline.io import atomic_path
from pipeline.metrics import ID_COLUMN

SUM_TOLERANCE = 1e-6
# 8 significant digits: rounding moves a row sum by < 1e-7, well inside the tolerance.
FLOAT_FORMAT = "%.8g"


# ---------------------------------------------------------------------------- validation


def read_sample(sample_path: Path) -> tuple[list[str], dict[str, int]]:
    """(header, test id -> its row) of sample_submission.csv (rows 1-based, header = row 1): the header
    is the submission format (id column, then the class columns in order)."""
    if not sample_path.exists():
        raise StageError(f"{sample_path} not found: run the ingest stage first")
    with open(sample_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or len(header) < 3:
            raise BadInputError(sample_path, f"header must be an id column and class columns, got {header}", row=1)
        return header, {fields[0]: rowno for rowno, fields in enumerate(reader, start=2) if fields}


def header_problem(header: list[str], expected: list[str]) -> str | None:
    if header == expected:
        return None
    missing = [c for c in expected if c not in header]
    extra = [c for c in header if c not in expected]
    duplicated = sorted({c for c in header if header.count(c) > 1})
    parts = [f"missing column(s) {', '.join(missing)}"] if missing else []
    parts += [f"unexpected column(s) {', '.join(extra)}"] if extra else []
    parts += [f"duplicated column(s) {', '.join(duplicated)}"] if duplicated else []
    if not parts:
        parts = [f"columns out of order: {','.join(header)}"]
    return f"header must be exactly {','.join(expected)}: " + "; ".join(parts)


def value_problem(column: str, text: str) -> tuple[float | None, str | None]:
    """(value, None) for a probability in (0, 1], else (None, what is wrong)."""
    try:
        value = float(text)
    except ValueError:
        return None, f"{column} = {text!r} is not a number"
    if not math.isfinite(value):
        return None, f"{column} is {text}, not a finite number"
    if value <= 0:
        hint = " (Kaggle's log loss explodes on 0: keep calibrate.clip on)" if value == 0 else ""
        return None, f"{column} = {text} is not in (0, 1]{hint}"
    if value > 1:
        return None, f"{column} = {text} is not in (0, 1]"
    return value, None


def row_problem(fields: list[str], header: list[str], ids: dict[str, int], seen: dict[str, int],
                sample_name: str) -> str | None:
    if len(fields) != len(header):
        return f"has {len(fields)} fields, expected {len(header)} ({','.join(header)})"
    img = fields[0]
    if img in seen:
        return f"duplicate id {img} (first at row {seen[img]})"
    if img not in ids:
        return f"id {img!r} is not a test id in {sample_name}"
    total = 0.0
    for column, text in zip(header[1:], fields[1:], strict=True):
        value, problem = value_problem(column, text)
        if problem:
            return f"{img}: {problem}"
        total += value
    if abs(total - 1.0) > SUM_TOLERANCE:
        return f"{img}: probabilities sum to {total:.9g}, not 1 (tolerance {SUM_TOLERANCE:g})"
    return None


def validate_submission(path: Path | str, sample_path: Path | str, shown_as: str | None = None) -> int:
    """Check a submission file against sample_submission.csv; return its row count or raise
    ``BadInputError`` naming the file (``shown_as`` if given) and the row."""
    path, sample_path = Path(path), Path(sample_path)
    name = shown_as or str(path)
    expected, ids = read_sample(sample_path)
    if not path.exists():
        raise BadInputError(name, "file not found")
    seen: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise BadInputError(name, f"empty file: expected the header {','.join(expected)} and one row per test id", row=1)
        if problem := header_problem(header, expected):
            raise BadInputError(name, problem, row=1)
        for rowno, fields in enumerate(reader, start=2):
            if problem := row_problem(fields, expected, ids, seen, sample_path.name):
                raise BadInputError(name, problem, row=rowno)
            seen[fields[0]] = rowno
    missing = [img for img in ids if img not in seen]
    if missing:
        first = missing[0]
        raise BadInputError(name, f"{len(missing)} test id(s) missing, first {first} (row {ids[first]} of {sample_path})")
    return len(seen)


# ---------------------------------------------------------------------------- building


def read_source(pred_path: Path, classes: list[str], produced_by: str) -> tuple[pd.Series, np.ndarray]:
    """(ids, probabilities) of a predictions file (``id`` + the class columns); refused with file, row
    and column when a value is not a number, not finite or negative (renormalising an all-negative row
    would turn it into a valid-looking one), and with file and row when a row is all zeros."""
    expected = [ID_COLUMN, *classes]
    if not pred_path.exists():
        raise StageError(f"{pred_path} not found: run the {produced_by} stage first")
    try:
        df = pd.read_csv(pred_path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise BadInputError(pred_path, f"empty file: expected the header {','.join(expected)}", row=1) from None
    if problem := header_problem([str(c) for c in df.columns], expected):
        raise BadInputError(pred_path, problem, row=1)
    values = df[classes].apply(pd.to_numeric, errors="coerce")
    not_numbers = values.isna() & ~df[classes].apply(lambda col: col.str.strip().str.lower().eq("nan"))
    if not_numbers.to_numpy().any():
        row, col = np.argwhere(not_numbers.to_numpy())[0]
        column = classes[col]
        raise BadInputError(pred_path, f"{column} = {df[column].iat[row]!r} is not a number", row=int(row) + 2)
    # Checked here, cell by cell: after renormalising, one NaN, inf or all-zero row spoils every cell
    # of its row and the built file would blame the row's first column.
    numbers = values.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(numbers) | (numbers < 0)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        column, text = classes[col], df[classes[col]].iat[row]
        finite = np.isfinite(numbers[row, col])
        problem = f"{column} = {text} is negative" if finite else f"{column} is {text}, not a finite number"
        raise BadInputError(pred_path, problem, row=int(row) + 2)
    empty = ~(numbers.sum(axis=1) > 0)
    if empty.any():
        row = int(np.argmax(empty))
        raise BadInputError(pred_path, f"{df[ID_COLUMN].iat[row]}: every probability is 0", row=row + 2)
    return df[ID_COLUMN], numbers


def write_submission(ids: Sequence[str], probs: np.ndarray, sample_path: Path, out_path: Path,
                     shown_as: str | None = None) -> int:
    """Write ``out_path`` in the sample submission's format (its id column, then its class columns, whose
    order ``probs``' columns must follow), rows renormalised as Kaggle does, validated before it replaces
    anything; returns rows."""
    header, _ = read_sample(sample_path)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(ids), len(header) - 1):
        raise StageError(f"{len(ids)} ids and probabilities of shape {probs.shape} for the {len(header) - 1} classes "
                         f"of {sample_path}")
    with np.errstate(divide="ignore", invalid="ignore"):
        probs = probs / probs.sum(axis=1, keepdims=True)  # Kaggle renormalises too: the file is what is scored
    out = pd.DataFrame(probs, columns=header[1:])
    out.insert(0, header[0], list(ids))
    with atomic_path(out_path) as tmp:
        out.to_csv(tmp, index=False, float_format=FLOAT_FORMAT, na_rep="NaN")
        return validate_submission(tmp, sample_path, shown_as=shown_as or str(out_path))


def build_submission(pred_path: Path, sample_path: Path, out_path: Path, produced_by: str = "calibrate") -> int:
    """Write ``out_path`` in the sample submission's format from a predictions file, validated before it
    replaces anything; returns rows. Rows map 1:1 onto the predictions file, so a refusal's row number
    points into both."""
    header, _ = read_sample(sample_path)
    ids, probs = read_source(pred_path, header[1:], produced_by)
    return write_submission(ids.tolist(), probs, sample_path, out_path, shown_as=f"{out_path} (built from {pred_path})")
