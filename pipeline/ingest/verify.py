"""Verify a materialised competition folder against the spec and write the normalised view every later
stage reads (pipeline.competition): ``train_index.csv``, ``test_index.csv``, ``quarantine.csv`` and
``competition.json``. Composes the layout and CSV checks (pipeline.ingest.checks), the image decode
check (pipeline.ingest.images) and the duplicate count (pipeline.ingest.duplicates)."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.competition import (
    TEST_INDEX,
    TEST_INDEX_COLUMNS,
    TRAIN_INDEX,
    TRAIN_INDEX_COLUMNS,
    Competition,
    write_competition,
)
from pipeline.config import CompetitionConfig
from pipeline.errors import BadInputError
from pipeline.ingest.checks import (
    TrainRow,
    check_submission_ids,
    normalise_csv_encodings,
    read_submission_header,
    require_disjoint_ids,
    require_every_class,
    require_layout,
    rows_from_class_folders,
    rows_from_labels_file,
    scan_flat_folder,
)
from pipeline.ingest.duplicates import Duplicates, find_duplicates
from pipeline.ingest.images import announce_exif_rotation, verify_images

QUARANTINE_HEADER = ["id", "path", "reason"]


@dataclass(frozen=True)
class Ingested:
    train: list[TrainRow]
    test: list[str]
    quarantined: list[tuple[str, str, str]]  # (id, path, reason)
    competition: Competition
    rotated: list[str]  # paths of images with an EXIF orientation other than "upright"
    duplicates: Duplicates  # test images repeating a train image, train images repeating another group's


def verify_and_index(build: Path, origin: Path, spec: CompetitionConfig, on_corrupt: str, source: str) -> Ingested:
    """Check the competition folder in ``build`` against ``spec`` (``origin`` names it in errors) and
    write the normalised indexes and competition.json."""
    require_layout(build, origin, spec)
    normalise_csv_encodings(build, origin, spec)
    id_column, classes = read_submission_header(build / spec.sample_submission, origin / spec.sample_submission)
    test_files = scan_flat_folder(build, origin, spec.test_dir, spec, "test")
    if spec.layout == "folder":
        train = rows_from_class_folders(build, origin, spec, classes)
    else:
        train = rows_from_labels_file(build, origin, spec, classes, scan_flat_folder(build, origin, spec.train_dir, spec, "train"))
    require_disjoint_ids(train, test_files, origin, spec)
    require_every_class(train, classes, origin, spec)
    test = check_submission_ids(build / spec.sample_submission, origin / spec.sample_submission, id_column, test_files)
    paths = [row.path for row in train] + [path for _, path in test]
    id_of = {row.path: row.id for row in train} | {path: image_id for image_id, path in test}
    findings = verify_images(build, origin, paths, on_corrupt)
    quarantined = [(id_of[path], path, reason) for _, path, reason in findings.quarantined]
    announce_exif_rotation(findings.rotated, len(paths))
    left_out = {path for _, path, _ in quarantined}
    for path in left_out:
        (build / path).unlink()
    train = [row for row in train if row.path not in left_out]
    require_every_class(train, classes, origin, spec, len(left_out))
    test = [(image_id, path) for image_id, path in test if path not in left_out]
    if not test:
        raise BadInputError(origin / spec.test_dir, f"no test images left after quarantining {len(left_out)}")
    duplicates = find_duplicates([(row.path, row.group or row.id) for row in train], [path for _, path in test],
                                 findings.fingerprints)
    announce_duplicates(duplicates, spec.group_column or "image")
    write_rows(build / TRAIN_INDEX, TRAIN_INDEX_COLUMNS, ([r.id, r.path, r.label, r.group] for r in train))
    write_rows(build / TEST_INDEX, TEST_INDEX_COLUMNS, ([image_id, path] for image_id, path in test))
    write_rows(build / "quarantine.csv", QUARANTINE_HEADER, (list(q) for q in quarantined))
    competition = Competition(classes=tuple(classes), id_column=id_column, has_groups=spec.group_column is not None,
                              group_name=spec.group_column or "image", layout=spec.layout, source=source)
    write_competition(build, competition)
    return Ingested(train, [image_id for image_id, _ in test], quarantined, competition, findings.rotated, duplicates)


def write_rows(path: Path, header: list[str], rows: Iterable[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def announce_duplicates(duplicates: Duplicates, group_name: str) -> None:
    """Information, not an error: a test image that repeats a train image has a known label, and a
    train image that repeats one of another group leaks across the group split. Said once, with an
    example of each kind; the counts are also ingest's figures."""
    kinds = [(duplicates.test_exact, "test images are byte-identical to a train image"),
             (duplicates.test_near, "test images nearly repeat a train image"),
             (duplicates.train_exact, f"train images are byte-identical to one of another {group_name}"),
             (duplicates.train_near, f"train images nearly repeat one of another {group_name}")]
    for matches, what in kinds:
        if matches:
            first = matches[0]
            print(f"[ingest] notice: {len(matches)} {what} (first: {first.path} ~ {first.other}); "
                  "counted in the ingest figures, nothing is removed", file=sys.stderr, flush=True)
