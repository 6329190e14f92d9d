"""Errors the CLI reports as one clear line and exit code 2 (no traceback)."""

from __future__ import annotations

from pathlib import Path


class StageError(RuntimeError):
    """A failed precondition or bad input that the user must fix."""


class BadInputError(StageError):
    """Bad input data: names the file and, where there is one, the row (1-based, header = row 1)."""

    def __init__(self, file: Path | str, problem: str, row: int | None = None):
        self.file = Path(file)
        self.row = row
        self.problem = problem
        where = f"{file}" + (f", row {row}" if row is not None else "")
        super().__init__(f"{where}: {problem}")
