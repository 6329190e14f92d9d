"""The competition as data: what ingest learned from the files, read by every later stage.

Ingest verifies whichever layout ``cfg.competition`` names (``folder``: one folder per class;
``csv``: a labels file + a flat image folder) and writes one normalised view of it:

- ``data/raw/train_index.csv``: ``id,path,label,group`` (group empty when the competition has none;
  then every image is its own group), paths relative to data/raw;
- ``data/raw/test_index.csv``: ``id,path``;
- ``data/raw/competition.json``: the class names in the sample submission's column order, the
  submission's id column, whether groups exist, the layout and the data source.

Nothing downstream of ingest knows which layout the data came in: it reads these through
:func:`read_competition` and :func:`label_indices`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import BadInputError, StageError
from pipeline.io import atomic_write_json, read_json

COMPETITION_FILE = "competition.json"
TRAIN_INDEX = "train_index.csv"
TEST_INDEX = "test_index.csv"
TRAIN_INDEX_COLUMNS = ["id", "path", "label", "group"]
TEST_INDEX_COLUMNS = ["id", "path"]


@dataclass(frozen=True)
class Competition:
    """What a stage needs to know about the competition, whatever its layout."""

    classes: tuple[str, ...]  # the sample submission's class columns, in its order
    id_column: str  # the sample submission's id column (the submission header's first field)
    has_groups: bool  # a group column exists (State Farm: drivers); else validation is per image
    group_name: str  # what a group is called in reports ("subject", "image")
    layout: str
    source: str  # synthetic | shapes | dir | zip | kaggle: predictions from synthetic data are never uploaded

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def submission_header(self) -> list[str]:
        return [self.id_column, *self.classes]

    @property
    def synthetic(self) -> bool:
        return self.source in ("synthetic", "shapes")


def write_competition(raw_dir: Path, competition: Competition) -> Path:
    data: dict[str, Any] = asdict(competition)
    data["classes"] = list(competition.classes)
    return atomic_write_json(Path(raw_dir) / COMPETITION_FILE, data)


def read_competition(raw_dir: Path | str) -> Competition:
    path = Path(raw_dir) / COMPETITION_FILE
    if not path.exists():
        raise StageError(f"{path} not found: run the ingest stage first")
    data = read_json(path)
    return Competition(**{**data, "classes": tuple(data["classes"])})


def label_indices(labels: Sequence[object], classes: Sequence[str], file: Path | str = "labels",
                  allow_missing: bool = False) -> np.ndarray:
    """Class names -> their index in ``classes``; -1 for a missing label (test rows) when
    ``allow_missing``. An unknown name is an error naming the file and row (header = row 1), never a
    silent -1."""
    position = {name: i for i, name in enumerate(classes)}
    out = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        missing = label is None or (isinstance(label, float) and np.isnan(label)) or label == ""
        if missing and allow_missing:
            out[i] = -1
            continue
        index = position.get(str(label))
        if index is None:
            raise BadInputError(file, f"label {label!r} is not a class of the competition ({', '.join(classes)})",
                                row=i + 2)
        out[i] = index
    return out
