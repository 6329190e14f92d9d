"""The competition folder's layout and CSVs against the competition spec (``cfg.competition``): folders
and files present, CSVs UTF-8 (pipeline.ingest.csv_encoding), image file names fitting the spec, every
train image labelled exactly once with a known class (class folders and/or a labels file), ids, labels
and groups without stray whitespace, the sample submission's header (the classes and their order) and
ids (exactly the test images). Every failure is a ``BadInputError`` naming the file (and CSV row)."""

from __future__ import annotations

import codecs
import csv
import os
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import CompetitionConfig
from pipeline.errors import BadInputError
from pipeline.ingest.csv_encoding import require_utf8
from pipeline.metrics import FOLD_COLUMN, ID_COLUMN


@dataclass(frozen=True)
class TrainRow:
    id: str
    path: str  # relative to the competition folder (data/raw)
    label: str
    group: str  # "" without a group column


# ---------------------------------------------------------------------------- layout


def require_layout(build: Path, origin: Path, spec: CompetitionConfig) -> None:
    shape = ("train_dir/<class>/<image>" if spec.layout == "folder" else f"{spec.labels_csv} + train_dir/<image>")
    for rel in (spec.train_dir, spec.test_dir):
        if not (build / rel).is_dir():
            raise BadInputError(origin / rel, f"missing folder (competition.layout={spec.layout}: {shape}; "
                                              f"test images in {spec.test_dir}/)")
    for rel in (spec.sample_submission, spec.labels_csv):
        if rel and not (build / rel).is_file():
            raise BadInputError(origin / rel, "missing file")


def normalise_csv_encodings(build: Path, origin: Path, spec: CompetitionConfig) -> None:
    """Encodings are handled once, here: a CSV that is not UTF-8 is refused, naming the row and byte
    offset of its first bad byte (pipeline.ingest.csv_encoding); one saved with a UTF-8 byte-order mark is
    rewritten without it, so no later reader (split, submit) sees ``\\ufeffimg`` as a column name. A
    new file replaces the old, so a hardlinked source file is never modified."""
    for rel in (spec.sample_submission, spec.labels_csv):
        if not rel:
            continue
        path = build / rel
        data = path.read_bytes()
        require_utf8(data, origin / rel)
        if data.startswith(codecs.BOM_UTF8):
            path.unlink()
            path.write_bytes(data[len(codecs.BOM_UTF8):])


def sorted_entries(folder: Path) -> list[os.DirEntry[str]]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def image_id_of(name: str, spec: CompetitionConfig) -> str | None:
    """The id an image file name encodes through ``competition.filename`` (``{id}.jpg``), or None."""
    prefix, suffix = spec.filename.split("{id}")
    if not (name.startswith(prefix) and name.endswith(suffix)) or len(name) <= len(prefix) + len(suffix):
        return None
    return name[len(prefix):len(name) - len(suffix)]


def require_image_name(entry: os.DirEntry[str], where: Path, spec: CompetitionConfig) -> str:
    """The image's id; an error for a folder, a symlink loop, another extension or a name the
    filename pattern does not fit."""
    if entry.is_dir():
        raise BadInputError(where, "unexpected folder (images lie directly in their folder)")
    if entry.is_symlink() and not os.path.exists(entry.path):
        target = os.readlink(entry.path)
        raise BadInputError(where, f"symbolic link to {target!r}, which does not resolve (missing, or a link loop)")
    if not entry.name.lower().endswith(tuple(e.lower() for e in spec.extensions)):
        raise BadInputError(where, f"not an image file (competition.extensions: {', '.join(spec.extensions)})")
    image_id = image_id_of(entry.name, spec)
    if image_id is None:
        raise BadInputError(where, f"file name does not fit competition.filename {spec.filename!r}")
    return image_id


def scan_flat_folder(build: Path, origin: Path, rel: str, spec: CompetitionConfig, kind: str) -> dict[str, str]:
    """id -> path (relative to the competition folder) of every image in the flat folder ``rel``."""
    found: dict[str, str] = {}
    for entry in sorted_entries(build / rel):
        image_id = require_image_name(entry, origin / rel / entry.name, spec)
        if image_id in found:
            raise BadInputError(origin / rel / entry.name, f"duplicate image id {image_id!r}: also {found[image_id]}")
        found[image_id] = f"{rel}/{entry.name}"
    if not found:
        raise BadInputError(origin / rel, f"no {kind} images" + (" (empty test set)" if kind == "test" else ""))
    return found


def scan_class_folders(build: Path, origin: Path, spec: CompetitionConfig, classes: list[str]) -> dict[str, tuple[str, str]]:
    """id -> (class folder, path) of every train image under ``train_dir/<class>/``."""
    found: dict[str, tuple[str, str]] = {}
    for folder in sorted_entries(build / spec.train_dir):
        where = origin / spec.train_dir / folder.name
        if not folder.is_dir():
            raise BadInputError(where, f"unexpected file (train images lie in {spec.train_dir}/<class>/)")
        if folder.name not in classes:
            raise BadInputError(where, f"class folder {folder.name!r} is not a class column of {spec.sample_submission} "
                                       f"({', '.join(classes)})")
        for entry in sorted_entries(Path(folder.path)):
            image_id = require_image_name(entry, where / entry.name, spec)
            if image_id in found:
                raise BadInputError(where / entry.name, f"duplicate image id {image_id!r}: also in "
                                                        f"{spec.train_dir}/{found[image_id][0]}/")
            found[image_id] = (folder.name, f"{spec.train_dir}/{folder.name}/{entry.name}")
    if not found:
        raise BadInputError(origin / spec.train_dir, "no train images")
    return found


# ---------------------------------------------------------------------------- labels


def rows_from_class_folders(build: Path, origin: Path, spec: CompetitionConfig, classes: list[str]) -> list[TrainRow]:
    """Labels from the class folders; with a labels file (State Farm's driver list), every row must
    name an image lying in the folder of its label, and every image must be listed once."""
    found = scan_class_folders(build, origin, spec, classes)
    if not spec.labels_csv:
        return [TrainRow(image_id, path, label, "") for image_id, (label, path) in found.items()]
    files = {image_id: path for image_id, (_, path) in found.items()}

    def in_its_class_folder(image_id: str, label: str) -> str | None:
        folder = found[image_id][0]
        return None if folder == label else f"{image_id} is labelled {label} but lies in {spec.train_dir}/{folder}/"

    return listed_rows(build, origin, spec, classes, files, lambda label: f"{label}/", in_its_class_folder)


def rows_from_labels_file(build: Path, origin: Path, spec: CompetitionConfig, classes: list[str],
                          files: dict[str, str]) -> list[TrainRow]:
    """CSV layout: every row names an image of the flat train folder and a class; every image is listed once."""
    return listed_rows(build, origin, spec, classes, files, lambda label: "", lambda image_id, label: None)


def listed_rows(build: Path, origin: Path, spec: CompetitionConfig, classes: list[str], files: dict[str, str],
                folder_of: Callable[[str], str], misplaced: Callable[[str, str], str | None]) -> list[TrainRow]:
    """The labels file's rows, each naming an image of ``files`` (id -> path) once, and every image
    listed: a repeat, a missing image (at ``<train_dir>/<folder_of(label)><file>``) or a ``misplaced``
    one is refused with its row."""
    label_file = origin / str(spec.labels_csv)
    rows: list[TrainRow] = []
    first_line: dict[str, int] = {}
    for line, image_id, label, group in read_label_rows(build / str(spec.labels_csv), label_file, spec, classes):
        if image_id in first_line:
            raise BadInputError(label_file, f"duplicate id {image_id} (first listed on row {first_line[image_id]})", row=line)
        if image_id not in files:
            raise BadInputError(label_file, f"listed image {image_id} is missing: no "
                                            f"{spec.train_dir}/{folder_of(label)}{spec.filename.format(id=image_id)}"
                                            f"{normalisation_hint(image_id, files)}", row=line)
        if (problem := misplaced(image_id, label)) is not None:
            raise BadInputError(label_file, problem, row=line)
        first_line[image_id] = line
        rows.append(TrainRow(image_id, files[image_id], label, group))
    require_all_listed(files.keys() - first_line.keys(), files, origin, spec)
    return rows


def normalisation_hint(image_id: str, ids: Iterable[str]) -> str:
    """When ``image_id`` matches an id only after Unicode normalisation (an accented name typed as
    NFC on one side, stored NFD by macOS on the other: they print alike), say so, code points shown."""
    key = unicodedata.normalize("NFC", image_id)
    twin = next((other for other in ids if other != image_id and unicodedata.normalize("NFC", other) == key), None)
    if twin is None:
        return ""
    return (f"; an image named {ascii(twin)} ({normal_form(twin)}) differs from {ascii(image_id)} ({normal_form(image_id)}) "
            "only in Unicode normalisation: rename the file or the row so both use the same form (NFC)")


def normal_form(text: str) -> str:
    return next((form for form in ("NFC", "NFD") if unicodedata.is_normalized(form, text)), "mixed")


def require_all_listed(unlisted: set[str], paths: dict[str, str], origin: Path, spec: CompetitionConfig) -> None:
    if unlisted:
        first = sorted(unlisted)[0]
        raise BadInputError(origin / paths[first], f"image not listed in {spec.labels_csv} ({len(unlisted)} unlisted in all)")


def read_table(path: Path, label: Path, required: list[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row as column -> value) of a CSV whose header holds ``required`` (other columns
    are allowed); blank lines skipped; a row with the wrong field count is an error with its row."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise BadInputError(label, f"empty file (expected a header with {','.join(required)})", row=1)
            missing = [c for c in required if c not in header]
            if missing:
                raise BadInputError(label, f"header lacks column(s) {', '.join(missing)} (got {','.join(header)})", row=1)
            for fields in reader:
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise BadInputError(label, f"expected {len(header)} fields, got {len(fields)}", row=reader.line_num)
                yield reader.line_num, dict(zip(header, fields, strict=True))
    except UnicodeDecodeError:
        require_utf8(path.read_bytes(), label)  # names the first bad byte's row and offset
        raise
    except csv.Error as err:
        raise BadInputError(label, f"malformed CSV ({err})") from None


def clean_value(value: str, column: str, label: Path, line: int) -> str:
    """Ids, labels and groups are used as keys: surrounding whitespace would make ``p051`` and
    ``p051 `` two drivers (one in train, one in validation), so it is refused, as is an empty value."""
    if not value.strip():
        raise BadInputError(label, f"empty {column}", row=line)
    if value != value.strip():
        raise BadInputError(label, f"{column} {value!r} has leading or trailing whitespace", row=line)
    return value


def read_label_rows(path: Path, label: Path, spec: CompetitionConfig, classes: list[str]) -> Iterator[tuple[int, str, str, str]]:
    """(line, id, label, group) of the labels file, each value checked; groups that differ only in
    case (``P051`` and ``p051``) are refused rather than silently treated as two groups."""
    columns = [spec.id_column, spec.label_column, *([spec.group_column] if spec.group_column else [])]
    group_seen: dict[str, tuple[str, int]] = {}
    for line, row in read_table(path, label, columns):
        image_id = clean_value(row[spec.id_column], spec.id_column, label, line)
        name = clean_value(row[spec.label_column], spec.label_column, label, line)
        if name not in classes:
            raise BadInputError(label, f"unknown {spec.label_column} {name!r}: not a class column of "
                                       f"{spec.sample_submission} ({', '.join(classes)})", row=line)
        group = ""
        if spec.group_column:
            group = clean_value(row[spec.group_column], spec.group_column, label, line)
            other, other_line = group_seen.setdefault(group.casefold(), (group, line))
            if other != group:
                raise BadInputError(label, f"{spec.group_column} {group!r} differs only in case from {other!r} "
                                           f"(row {other_line}): make them one spelling", row=line)
        yield line, image_id, name, group


# ---------------------------------------------------------------------------- submission and classes


def read_submission_header(path: Path, label: Path) -> tuple[str, list[str]]:
    """(id column, class columns) of the sample submission: the class names and their order."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), None) or []
    except UnicodeDecodeError:
        require_utf8(path.read_bytes(), label)  # names the first bad byte's row and offset
        raise
    if len(header) < 3:
        raise BadInputError(label, f"header must be an id column and at least two class columns, got {','.join(header)}",
                            row=1)
    problems = [name for name in header if not name.strip() or name != name.strip()]
    if problems:
        raise BadInputError(label, f"column name {problems[0]!r} is empty or has surrounding whitespace", row=1)
    if len(set(header)) != len(header):
        duplicated = sorted({c for c in header if header.count(c) > 1})
        raise BadInputError(label, f"duplicated column(s) {', '.join(duplicated)}", row=1)
    reserved = {ID_COLUMN, FOLD_COLUMN} & set(header[1:])
    if reserved:  # the pipeline's own predictions files use these column names
        raise BadInputError(label, f"a class named {sorted(reserved)[0]!r} is not supported (reserved column name)", row=1)
    return header[0], header[1:]


def require_disjoint_ids(train: list[TrainRow], test: dict[str, str], origin: Path, spec: CompetitionConfig) -> None:
    both = sorted({row.id for row in train} & test.keys())
    if both:
        raise BadInputError(origin / test[both[0]], f"duplicate image id {both[0]!r}: a train image too "
                                                    f"({len(both)} ids in both)")


def require_every_class(train: list[TrainRow], classes: list[str], origin: Path, spec: CompetitionConfig,
                        n_quarantined: int = 0) -> None:
    """A class of the submission without any training image cannot be learnt: refused, also when
    quarantining corrupt images has emptied it."""
    counts = Counter(row.label for row in train)
    empty = [name for name in classes if not counts.get(name)]
    if empty:
        after = f" left after quarantining {n_quarantined}" if n_quarantined else ""
        raise BadInputError(origin / spec.train_dir, f"class {empty[0]!r} of {spec.sample_submission} has no training "
                                                     f"images{after} ({len(empty)} such classes: {', '.join(empty)})")


def check_submission_ids(path: Path, label: Path, id_column: str, test_files: dict[str, str]) -> list[tuple[str, str]]:
    """The sample submission's ids are exactly the test images, each once: (id, path), sorted by id."""
    first_line: dict[str, int] = {}
    for line, row in read_table(path, label, [id_column]):
        image_id = row[id_column]
        if image_id in first_line:
            raise BadInputError(label, f"duplicate id {image_id} (first listed on row {first_line[image_id]})", row=line)
        if image_id not in test_files:
            raise BadInputError(label, f"{image_id} is not a test image{normalisation_hint(image_id, test_files)}", row=line)
        first_line[image_id] = line
    missing = sorted(test_files.keys() - first_line.keys())
    if missing:
        raise BadInputError(label, f"no row for test image {missing[0]} ({len(missing)} test images missing in all)")
    return [(image_id, test_files[image_id]) for image_id in sorted(test_files)]
