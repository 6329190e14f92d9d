"""ingest: every source lands in data/raw verified and indexed, for both competition layouts (State
Farm's class folders + driver list, and Kaggle's CSV layout); every bad input fails naming its file
(and CSV row), exits 2 through the CLI, and leaves data/raw as it was."""

from __future__ import annotations

import codecs
import csv
import functools
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import types
import unicodedata
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image
from test_duplicates import photo

from pipeline import cli
from pipeline.competition import Competition, read_competition
from pipeline.config import CompetitionConfig, Config, load_profile, write_params
from pipeline.errors import BadInputError, StageError
from pipeline.ingest import archive, images
from pipeline.io import read_json
from pipeline.stages import ingest
from pipeline.synthetic import shapes
from pipeline.synthetic.drivers import CLASSES as STATEFARM_CLASSES

N_DRIVERS, N_TEST = 3, 5
LAYOUTS = ("folder", "csv")
# The real demo-csv profile, shrunk to 2 images per class (tests keep no config of their own).
CSV_OVERRIDES = {"ingest.shapes.n_train": 10, "ingest.shapes.n_test": 4, "ingest.shapes.width": 16,
                 "ingest.shapes.height": 16, "model.weights": "none"}
UNKNOWN_CLASS = "c10"  # in neither competition


# ---------------------------------------------------------------------------- fixture data


def jpeg_bytes(seed: int, size: tuple[int, int] = (16, 12)) -> bytes:
    """A small noise JPEG, so that its image data is not dwarfed by the ~600 bytes of headers."""
    image = Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def make_statefarm_folder(folder: Path) -> Path:
    """3 drivers x 10 classes x 1 train image, 5 test images, both CSVs: State Farm in miniature.
    Train image n (row n + 2 of driver_imgs_list.csv) is img_n.jpg; test images are img_100..104."""
    rows = []
    for d in range(N_DRIVERS):
        for c in STATEFARM_CLASSES:
            n = len(rows)
            path = folder / "imgs/train" / c / f"img_{n}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg_bytes(n))
            rows.append([f"p{d:03d}", c, f"img_{n}.jpg"])
    write_csv(folder / "driver_imgs_list.csv", ["subject", "classname", "img"], rows)
    (folder / "imgs/test").mkdir(parents=True)
    tests = [f"img_{100 + i}.jpg" for i in range(N_TEST)]
    for i, img in enumerate(tests):
        (folder / "imgs/test" / img).write_bytes(jpeg_bytes(100 + i))
    write_csv(folder / "sample_submission.csv", ["img", *STATEFARM_CLASSES], [[img] + ["0.1"] * 10 for img in tests])
    return folder


@functools.cache
def profile(layout: str) -> Config:
    """State Farm's folder layout: the smoke profile; the CSV layout: demo-csv shrunk."""
    return load_profile("smoke") if layout == "folder" else load_profile("demo-csv", CSV_OVERRIDES)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """One competition folder per layout, made once; tests break copies of them."""
    root = tmp_path_factory.mktemp("pristine")
    s = profile("csv").ingest.shapes
    shapes.generate(root / "csv", root / "csv-hidden", n_classes=s.n_classes, n_train=s.n_train, n_test=s.n_test,
                    width=s.width, height=s.height, seed=s.seed)
    return {"folder": make_statefarm_folder(root / "folder"), "csv": root / "csv"}


@dataclass(frozen=True)
class Comp:
    """A writable competition folder of one layout and the config that ingests it (source=dir)."""

    layout: str
    folder: Path
    cfg: Config

    @property
    def spec(self) -> CompetitionConfig:
        return self.cfg.competition

    @property
    def raw(self) -> Path:
        return self.cfg.paths.path("raw")

    def read(self, rel: str) -> tuple[list[str], list[list[str]]]:
        rows = read_csv(self.folder / rel)
        return rows[0], rows[1:]

    def labels(self) -> tuple[list[str], list[list[str]]]:
        return self.read(str(self.spec.labels_csv))

    def set_labels(self, rows: list[list[str]], header: list[str] | None = None) -> None:
        write_csv(self.folder / str(self.spec.labels_csv), header or self.labels()[0], rows)

    def submission(self) -> tuple[list[str], list[list[str]]]:
        return self.read(self.spec.sample_submission)

    def set_submission(self, rows: list[list[str]], header: list[str] | None = None) -> None:
        write_csv(self.folder / self.spec.sample_submission, header or self.submission()[0], rows)

    def col(self, column: str | None) -> int:
        return self.labels()[0].index(str(column))

    def train_rows(self) -> list[tuple[str, str, str]]:
        """(id, label, group) of the labels file, in its order; group "" without a group column."""
        header, rows = self.labels()
        group = header.index(self.spec.group_column) if self.spec.group_column else None
        return [(r[self.col(self.spec.id_column)], r[self.col(self.spec.label_column)],
                 r[group] if group is not None else "") for r in rows]

    def train_path(self, image_id: str, label: str) -> str:
        name = self.spec.filename.format(id=image_id)
        return f"{self.spec.train_dir}/{label}/{name}" if self.layout == "folder" else f"{self.spec.train_dir}/{name}"

    def train_image(self, i: int) -> str:
        """Path (relative to the folder) of the image on row i + 2 of the labels file."""
        image_id, label, _ = self.train_rows()[i]
        return self.train_path(image_id, label)

    def test_path(self, image_id: str) -> str:
        return f"{self.spec.test_dir}/{self.spec.filename.format(id=image_id)}"

    def test_ids(self) -> list[str]:
        return [row[0] for row in self.submission()[1]]

    def test_image(self, j: int) -> str:
        return self.test_path(self.test_ids()[j])

    def fresh_id(self, n: int) -> str:
        """An id no image has, in the layout's style."""
        return f"img_{n}.jpg" if self.layout == "folder" else f"{n:010x}"

    def submission_row(self, image_id: str) -> list[str]:
        return [image_id] + ["0.1"] * (len(self.submission()[0]) - 1)


def make_comp(pristine: dict[str, Path], layout: str, root: Path, name: str = "comp") -> Comp:
    folder = root / name
    shutil.copytree(pristine[layout], folder)
    return Comp(layout, folder, with_source(profile(layout).at(root), "dir", folder))


@pytest.fixture(params=LAYOUTS)
def comp(request, pristine, tmp_path) -> Comp:
    """Each layout's competition folder, as a writable copy."""
    return make_comp(pristine, request.param, tmp_path)


@pytest.fixture
def statefarm(pristine, tmp_path) -> Comp:
    return make_comp(pristine, "folder", tmp_path)


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def with_source(cfg: Config, source: str, path: Path | None = None, **extra) -> Config:
    update = {"source": source, "path": str(path) if path else None, "watch": None, **extra}  # watch: re-derived
    return cfg.model_copy(update={"ingest": type(cfg.ingest).model_validate({**cfg.ingest.model_dump(), **update})})


def leftovers(cfg: Config) -> list[str]:
    """Temp siblings of data/raw and data/hidden that a finished run must not leave."""
    data = cfg.paths.path("raw").parent
    return sorted(p.name for p in data.iterdir() if p.name.startswith(".")) if data.exists() else []


def cli_exit_code(cfg: Config, tmp_path: Path) -> int:
    params = tmp_path / "params.yaml"
    write_params(cfg, params)
    return cli.main(["ingest", "--params", str(params)])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- happy paths


def test_dir_source_writes_layout_indexes_and_figures(comp):
    """data/raw holds the shipped files plus the normalised view (indexes, competition.json) that
    every later stage reads, the same for both layouts."""
    figures = ingest.run(comp.cfg)
    raw, train, (sub_header, sub_rows) = comp.raw, comp.train_rows(), comp.submission()

    assert (figures["n_train"], figures["n_test"]) == (len(train), len(sub_rows))
    assert figures["n_classes"] == len(sub_header) - 1 and figures["n_quarantined"] == 0
    assert figures["source"] == "dir" and figures["seconds"] >= 0
    if comp.layout == "folder":
        assert (figures["n_groups"], figures["per_group_min"], figures["per_group_max"]) == (N_DRIVERS, 10, 10)
    else:
        assert "n_groups" not in figures
    assert read_json(comp.cfg.paths.stage_metrics_file("ingest")) == figures

    train_index = read_csv(raw / "train_index.csv")
    assert train_index[0] == ["id", "path", "label", "group"]
    assert train_index[1:] == [[i, comp.train_path(i, label), label, group] for i, label, group in train]
    assert all((raw / row[1]).is_file() for row in train_index[1:])
    assert {row[3] == "" for row in train_index[1:]} == {comp.layout == "csv"}
    test_index = read_csv(raw / "test_index.csv")
    assert test_index == [["id", "path"]] + [[i, comp.test_path(i)] for i in sorted(comp.test_ids())]
    assert all((raw / path).is_file() for _, path in test_index[1:])
    assert read_csv(raw / "quarantine.csv") == [["id", "path", "reason"]]
    for shipped in (comp.spec.labels_csv, comp.spec.sample_submission):
        assert (raw / shipped).read_bytes() == (comp.folder / shipped).read_bytes()
    assert "no hidden labels" in (comp.cfg.paths.path("hidden") / "README.txt").read_text().lower()
    assert leftovers(comp.cfg) == []


def test_competition_json_comes_from_the_sample_submission(comp):
    """Class names and order, the id column and whether groups exist come from the files (the
    sample submission's header, the spec's group column), not from code."""
    header, rows = comp.submission()
    reordered = [header[0], *reversed(header[1:])]
    comp.set_submission([[r[0], *reversed(r[1:])] for r in rows], reordered)
    ingest.run(comp.cfg)
    has_groups = comp.layout == "folder"
    assert read_competition(comp.raw) == Competition(
        classes=tuple(reordered[1:]), id_column=reordered[0], has_groups=has_groups,
        group_name="subject" if has_groups else "image", layout=comp.layout, source="dir")
    if comp.layout == "folder":
        assert read_competition(comp.raw).classes == tuple(reversed(STATEFARM_CLASSES)) and header[0] == "img"
    else:
        assert read_competition(comp.raw).classes == tuple(reversed(shapes.CLASS_NAMES[:5])) and header[0] == "image_id"


def test_labels_file_columns_are_found_by_name(comp):
    """Columns of the labels file may come in any order, with extra ones beside them."""
    header, rows = comp.labels()
    comp.set_labels([["x", *reversed(r)] for r in rows], ["note", *reversed(header)])
    figures = ingest.run(comp.cfg)
    assert figures["n_train"] == len(rows)
    assert [r[:3] for r in read_csv(comp.raw / "train_index.csv")[1:]] == [
        [i, comp.train_path(i, label), label] for i, label, _ in comp.train_rows()]


def test_byte_order_marks_are_dropped_from_the_copies_only(comp):
    """CSVs saved with a UTF-8 BOM are accepted; data/raw's copies lose it (no later reader sees
    ``\\ufeffimg``), while the user's files, hardlinked into data/raw, stay byte for byte."""
    shipped = [str(comp.spec.labels_csv), comp.spec.sample_submission]
    id_column, first_id = comp.submission()[0][0], comp.train_rows()[0][0]
    originals = {}
    for rel in shipped:
        originals[rel] = codecs.BOM_UTF8 + (comp.folder / rel).read_bytes()
        (comp.folder / rel).write_bytes(originals[rel])
    ingest.run(comp.cfg)
    for rel in shipped:
        assert (comp.folder / rel).read_bytes() == originals[rel]
        assert (comp.raw / rel).read_bytes() == originals[rel][len(codecs.BOM_UTF8):]
    assert read_competition(comp.raw).id_column == id_column
    assert read_csv(comp.raw / "train_index.csv")[1][0] == first_id


def test_relative_symlinks_are_followed(comp):
    """A relative symbolic link to a real image (or CSV) is ingested as its target: a real file in
    data/raw, not a link that would dangle there."""
    elsewhere = comp.folder.parent / "elsewhere"
    elsewhere.mkdir()
    for rel in (comp.test_image(0), comp.train_image(0), comp.spec.sample_submission):
        target = elsewhere / Path(rel).name
        os.replace(comp.folder / rel, target)
        os.symlink(os.path.relpath(target, (comp.folder / rel).parent), comp.folder / rel)
    figures = ingest.run(comp.cfg)
    assert (figures["n_train"], figures["n_test"]) == (len(comp.train_rows()), len(comp.test_ids()))
    for rel in (comp.test_image(0), comp.train_image(0), comp.spec.sample_submission):
        assert not (comp.raw / rel).is_symlink() and (comp.raw / rel).read_bytes() == (comp.folder / rel).read_bytes()


def test_dir_source_hardlinks_on_one_filesystem_and_copies_otherwise(comp, monkeypatch):
    """The real data is ~4 GB: hardlinked when possible, copied across filesystems."""
    rel = comp.train_image(0)
    ingest.run(comp.cfg)
    assert (comp.raw / rel).stat().st_ino == (comp.folder / rel).stat().st_ino

    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    ingest.run(comp.cfg)  # a re-run replaces data/raw
    assert (comp.raw / rel).stat().st_ino != (comp.folder / rel).stat().st_ino
    assert (comp.raw / rel).read_bytes() == (comp.folder / rel).read_bytes()
    assert leftovers(comp.cfg) == []


def test_broken_link_does_not_switch_hardlinking_to_copying(tmp_path):
    """One broken link is an error naming it; it must not first turn the remaining ~4 GB of
    hardlinks into copies."""
    os.symlink("nowhere.jpg", tmp_path / "broken.jpg")
    link = archive.LinkOrCopy()
    with pytest.raises(BadInputError, match="does not resolve") as err:
        link(tmp_path / "broken.jpg", tmp_path / "copy.jpg")
    assert err.value.file == tmp_path / "broken.jpg" and link.can_link


def test_relative_path_is_taken_from_the_project_root(comp, tmp_path):
    cfg = with_source(comp.cfg, "dir", comp.folder.relative_to(tmp_path))
    assert ingest.run(cfg)["n_train"] == len(comp.train_rows())


def nest(folder: Path, bundle: Path, prefix: bool) -> None:
    """Kaggle's older bundle: every top-level folder and CSV in a zip of its own (``imgs.zip``,
    ``driver_imgs_list.csv.zip``); a folder's zip with or without the folder as top entry."""
    bundle.mkdir()
    for entry in folder.iterdir():
        if entry.is_dir():
            zip_folder(entry, bundle / f"{entry.name}.zip", prefix=f"{entry.name}/" if prefix else "")
        else:
            with zipfile.ZipFile(bundle / f"{entry.name}.zip", "w") as zf:
                zf.write(entry, entry.name)


@pytest.mark.parametrize("shape", ["flat", "wrapped", "nested_zips", "nested_bare_zips"])
def test_zip_source(comp, tmp_path, shape):
    """The competition zip as Kaggle ships it (entries at top level), wrapped in a folder, or with
    each entry in a nested zip."""
    archive = tmp_path / "competition.zip"
    if shape == "flat":
        zip_folder(comp.folder, archive)
    elif shape == "wrapped":
        zip_folder(comp.folder, archive, prefix="competition/")
    else:
        nest(comp.folder, tmp_path / "bundle", prefix=shape == "nested_zips")
        zip_folder(tmp_path / "bundle", archive)

    cfg = with_source(comp.cfg, "zip", archive)
    figures = ingest.run(cfg)
    assert (figures["n_train"], figures["n_test"], figures["source"]) == (len(comp.train_rows()), len(comp.test_ids()), "zip")
    assert sorted(p.name for p in comp.raw.iterdir()) == sorted(
        [p.name for p in comp.folder.iterdir()] + ["train_index.csv", "test_index.csv", "quarantine.csv", "competition.json"])
    rel = comp.test_image(0)
    assert (comp.raw / rel).read_bytes() == (comp.folder / rel).read_bytes()
    assert leftovers(cfg) == []


def test_quarantine_mode_leaves_corrupt_images_out(comp):
    train_rel, test_rel = comp.train_image(3), comp.test_image(2)
    truncate(comp.folder / train_rel)
    garble(comp.folder / test_rel)
    cfg = with_source(comp.cfg, "dir", comp.folder, on_corrupt="quarantine")
    figures = ingest.run(cfg)

    assert figures["n_quarantined"] == 2
    assert (figures["n_train"], figures["n_test"]) == (len(comp.train_rows()) - 1, len(comp.test_ids()) - 1)
    if comp.layout == "folder":
        assert (figures["per_group_min"], figures["per_group_max"]) == (9, 10)
    quarantine = read_csv(comp.raw / "quarantine.csv")
    assert [row[:2] for row in quarantine[1:]] == [[comp.train_rows()[3][0], train_rel], [comp.test_ids()[2], test_rel]]
    assert all("corrupt" in row[2] for row in quarantine[1:])
    assert comp.train_rows()[3][0] not in {row[0] for row in read_csv(comp.raw / "train_index.csv")}
    assert comp.test_ids()[2] not in {row[0] for row in read_csv(comp.raw / "test_index.csv")}
    assert not (comp.raw / train_rel).exists() and not (comp.raw / test_rel).exists()
    assert (comp.folder / train_rel).exists()  # the source is never touched


def test_quarantine_does_not_excuse_non_jpeg_files(comp):
    rel = comp.train_image(0)
    as_png(comp.folder / rel)
    with pytest.raises(BadInputError, match=f"{Path(rel).name}: not a JPEG"):
        ingest.run(with_source(comp.cfg, "dir", comp.folder, on_corrupt="quarantine"))


def test_quarantine_that_empties_a_class_is_refused(pristine, tmp_path):
    """Quarantining every training image of a class leaves a class no model can learn: refused."""
    comp = make_comp(pristine, "csv", tmp_path)  # 2 images per class
    label = comp.train_rows()[0][1]
    for i, (_, other, _) in enumerate(comp.train_rows()):
        if other == label:
            truncate(comp.folder / comp.train_image(i))
    cfg = with_source(comp.cfg, "dir", comp.folder, on_corrupt="quarantine")
    with pytest.raises(BadInputError, match=f"class '{label}' .*no training images") as err:
        ingest.run(cfg)
    assert err.value.file == comp.folder / comp.spec.train_dir
    assert not comp.raw.exists() and leftovers(cfg) == []


def test_image_pool_agrees_with_in_process_check(tmp_path, monkeypatch):
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    good.write_bytes(jpeg_bytes(1, (64, 48)))
    bad.write_bytes(jpeg_bytes(2, (64, 48)))
    truncate(bad)
    paths = [str(good), str(bad)] * 3
    serial = list(images.inspect_images(paths))
    monkeypatch.setattr(images, "POOL_MIN_IMAGES", 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert list(images.inspect_images(paths)) == serial
    assert [check.problem is None for check in serial] == [True, False] * 3
    assert [check.fingerprint is not None for check in serial] == [True, False] * 3


def test_exif_rotated_images_are_counted_and_announced(comp, capsys):
    """A phone photo's EXIF orientation is not applied (train and test alike, pipeline/data.py): ingest
    says so instead of training silently on sideways images."""
    image = Image.open(io.BytesIO(jpeg_bytes(7)))
    exif = Image.Exif()
    exif[images.EXIF_ORIENTATION] = 6  # "rotate 90 CW to display"
    image.save(comp.folder / comp.test_image(1), format="JPEG", exif=exif)
    figures = ingest.run(comp.cfg)
    assert figures["n_exif_rotated"] == 1
    err = capsys.readouterr().err
    assert f"1 of {figures['n_train'] + figures['n_test']} images carry an EXIF orientation (first: {comp.test_image(1)})" in err
    assert "not rotated" in err


def test_duplicates_are_counted_not_refused(comp, capsys, caplog):
    """A test image that is a train image under another id, or a train image repeating one of another
    group (any other image without groups): counted in the figures and the summary log line, announced,
    never an error. Exact: the same bytes; near: the same picture re-encoded."""
    clean = ingest.run(comp.cfg)
    assert (clean["n_test_dup_exact"], clean["n_test_dup_near"], clean["n_train_dup_exact"], clean["n_train_dup_near"]) == (0, 0, 0, 0)

    shutil.copy(comp.folder / comp.train_image(0), comp.folder / comp.test_image(0))  # exact, train -> test
    picture = photo(1, (96, 72))
    picture.save(comp.folder / comp.train_image(1), format="JPEG", quality=95)
    picture.save(comp.folder / comp.test_image(1), format="JPEG", quality=60)  # near: the same picture, re-encoded
    # train image 2 repeated by the last one, of another group (State Farm: 10 images per driver)
    shutil.copy(comp.folder / comp.train_image(2), comp.folder / comp.train_image(len(comp.train_rows()) - 1))
    within_group = comp.layout == "folder"  # images 3 and 4: one driver; without groups, two images
    shutil.copy(comp.folder / comp.train_image(3), comp.folder / comp.train_image(4))
    caplog.set_level("INFO", logger=ingest.__name__)
    capsys.readouterr()
    figures = ingest.run(comp.cfg)

    assert (figures["n_test_dup_exact"], figures["n_test_dup_near"]) == (1, 1)
    assert figures["n_train_dup_exact"] == (2 if within_group else 4)  # both images of each pair
    assert figures["n_train_dup_near"] == 0
    assert figures["n_train"] == clean["n_train"] and figures["n_quarantined"] == 0  # nothing left out
    assert read_json(comp.cfg.paths.stage_metrics_file("ingest")) == figures
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("ingest: "))
    assert "'n_test_dup_exact': 1" in summary and "'n_test_dup_near': 1" in summary
    err = capsys.readouterr().err
    assert f"1 test images are byte-identical to a train image (first: {comp.test_image(0)} ~ {comp.train_image(0)})" in err
    assert f"1 test images nearly repeat a train image (first: {comp.test_image(1)} ~ {comp.train_image(1)})" in err
    group = "subject" if within_group else "image"
    assert f"train images are byte-identical to one of another {group}" in err


def assert_workers_end_with_their_killed_parent(command: list[str], started: Callable[[], bool]) -> None:
    """Start ``command``, SIGKILL it once its pool workers are at work (``started``), then every worker must
    stop within seconds (a zombie waiting for init to reap it has stopped)."""
    import psutil

    parent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not started() and parent.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = [p for p in psutil.Process(parent.pid).children() if "spawn_main" in command_line(p)]
        assert len(workers) >= 2, "the pool never started"
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 2  # SIGTERM on the parent's death: milliseconds; a job's end: seconds
        while (alive := [p for p in workers if working(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        for orphan in alive:
            orphan.kill()
        assert not alive, f"{len(alive)} pool workers worked on after their parent was killed"
    finally:
        parent.kill()


def command_line(process) -> str:
    import psutil

    try:
        return " ".join(process.cmdline())
    except psutil.Error:  # gone meanwhile
        return ""


def working(process) -> bool:
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_synthetic_renderers_end_with_a_killed_ingest(tmp_path):
    """SIGKILL a synthetic ingest while its render pool works: the renderers stop at once (they rendered
    on to the end of their job, orphaned, 40 s and more at full size)."""
    out = tmp_path / "out"
    assert_workers_end_with_their_killed_parent(
        [sys.executable, "-m", "pipeline.synthetic.drivers", str(out), str(tmp_path / "hidden"), "--preset", "full"],
        started=lambda: any((out / "imgs/test").glob("*.jpg")))


def test_image_check_workers_end_with_a_killed_ingest(tmp_path):
    """The same for the decode-check pool of a `dir` source."""
    image = tmp_path / "big.jpg"
    Image.frombytes("RGB", (640, 480), random.Random(0).randbytes(640 * 480 * 3)).save(image, quality=95)
    script, marker = tmp_path / "pool.py", tmp_path / "started"
    script.write_text("import os, sys\nfrom pipeline.ingest import images\nos.cpu_count = lambda: 2\n"
                      "if __name__ == '__main__':  # spawned workers import this file too\n"
                      "    for n, _ in enumerate(images.inspect_images([sys.argv[1]] * 200_000)):\n"
                      f"        n == 1000 and open({str(marker)!r}, 'w').close()\n")
    assert_workers_end_with_their_killed_parent([sys.executable, str(script), str(image)], started=marker.exists)


def test_synthetic_source(smoke_cfg):
    """The State-Farm-shaped generator: drivers as groups, hidden test labels beside data/raw."""
    cfg = with_source(smoke_cfg, "synthetic")
    figures = ingest.run(cfg)
    syn = cfg.ingest.synthetic
    assert figures["n_groups"] == syn.n_train_drivers and figures["n_test"] == syn.n_test
    assert syn.train_per_driver[0] <= figures["per_group_min"] <= figures["per_group_max"] <= syn.train_per_driver[1]
    labels = read_csv(cfg.paths.path("hidden") / "test_labels.csv")
    assert labels[0] == ["id", "label", "group"]
    assert {row[0] for row in labels[1:]} == {row[0] for row in read_csv(cfg.paths.path("raw") / "test_index.csv")[1:]}
    assert read_competition(cfg.paths.path("raw")).source == "synthetic"
    assert leftovers(cfg) == []


def test_shapes_source(tmp_path):
    """The CSV-layout generator: no groups, string class names, hidden test labels beside data/raw."""
    cfg = profile("csv").at(tmp_path)
    figures = ingest.run(cfg)
    s = cfg.ingest.shapes
    assert (figures["n_train"], figures["n_test"], figures["n_classes"]) == (s.n_train, s.n_test, s.n_classes)
    assert "n_groups" not in figures
    labels = read_csv(cfg.paths.path("hidden") / "test_labels.csv")
    assert labels[0] == ["id", "label"]
    assert {row[0] for row in labels[1:]} == {row[0] for row in read_csv(cfg.paths.path("raw") / "test_index.csv")[1:]}
    competition = read_competition(cfg.paths.path("raw"))
    assert (competition.classes, competition.source, competition.has_groups) == (shapes.CLASS_NAMES[:5], "shapes", False)
    assert leftovers(cfg) == []


# ---------------------------------------------------------------------------- kaggle source


def isolate_from_kaggle_credentials(monkeypatch, tmp_path) -> None:
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home/.config"))


def test_kaggle_without_credentials_says_how_to_provide_them(smoke_cfg, tmp_path, monkeypatch):
    isolate_from_kaggle_credentials(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", None)  # must not even be imported
    cfg = with_source(smoke_cfg, "kaggle")
    with pytest.raises(StageError, match="KAGGLE_API_TOKEN.*access_token.*KAGGLE_USERNAME \\+ KAGGLE_KEY.*kaggle.json"):
        ingest.run(cfg)
    assert cli_exit_code(cfg, tmp_path) == 2
    assert not cfg.paths.path("raw").exists() and leftovers(cfg) == []


def fake_kaggle_client(archive: Path, calls: list) -> types.ModuleType:
    class KaggleApi:
        def authenticate(self) -> None:
            calls.append("authenticate")

        def competition_download_files(self, competition, path=None, **kwargs) -> None:
            calls.append(competition)
            shutil.copy(archive, Path(path) / f"{competition}.zip")

    module = types.ModuleType("kaggle.api.kaggle_api_extended")
    module.KaggleApi = KaggleApi
    return module


def test_kaggle_source_downloads_then_reads_the_zip(statefarm, tmp_path, monkeypatch, capsys):
    isolate_from_kaggle_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret-key-123")
    calls: list = []
    archive = zip_folder(statefarm.folder, tmp_path / "download.zip")
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", fake_kaggle_client(archive, calls))
    cfg = with_source(statefarm.cfg, "kaggle")
    figures = ingest.run(cfg)
    assert calls == ["authenticate", cfg.ingest.competition]
    assert figures["n_train"] == N_DRIVERS * 10 and figures["source"] == "kaggle"
    assert (cfg.paths.path("staging") / f"{cfg.ingest.competition}.zip").is_file()
    assert "secret-key-123" not in "".join(capsys.readouterr())


# ---------------------------------------------------------------------------- bad inputs


def truncate(path: Path, keep: float = 0.8) -> None:
    """Cut the file's tail (for the small fixture JPEGs: into the image data, past the headers)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garble(path: Path) -> None:
    """Keep the JPEG signature, replace the rest with junk."""
    path.write_bytes(images.JPEG_MAGIC + b"\x00junk" * 50)


def as_png(path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


# Each case breaks a fresh copy of the competition folder and returns the error it must cause:
# (the file it names, relative to the folder; the CSV row it names; words of the problem).
Expected = tuple[str, int | None, str]


def truncated_train_image(c: Comp) -> Expected:
    truncate(c.folder / c.train_image(3))
    return c.train_image(3), None, "truncated"


def corrupt_test_image(c: Comp) -> Expected:
    garble(c.folder / c.test_image(2))
    return c.test_image(2), None, "corrupt JPEG"


def png_named_jpg(c: Comp) -> Expected:
    as_png(c.folder / c.test_image(1))
    return c.test_image(1), None, "not a JPEG file (content: PNG"


def text_file_among_test_images(c: Comp) -> Expected:
    (c.folder / c.spec.test_dir / "notes.txt").write_text("not an image")
    return f"{c.spec.test_dir}/notes.txt", None, "not an image file"


def listed_but_missing(c: Comp) -> Expected:
    (c.folder / c.train_image(4)).unlink()
    return str(c.spec.labels_csv), 6, f"listed image {c.train_rows()[4][0]} is missing"


def present_but_unlisted(c: Comp) -> Expected:
    rel = c.train_path(c.fresh_id(999), c.train_rows()[0][1])
    (c.folder / rel).write_bytes(jpeg_bytes(999))
    return rel, None, f"image not listed in {c.spec.labels_csv}"


def unknown_label(c: Comp) -> Expected:
    """A class name in the labels file that the sample submission lacks."""
    rows = c.labels()[1]
    rows[5][c.col(c.spec.label_column)] = UNKNOWN_CLASS
    c.set_labels(rows)
    return str(c.spec.labels_csv), 7, f"unknown {c.spec.label_column} '{UNKNOWN_CLASS}': not a class column"


def class_without_training_images(c: Comp) -> Expected:
    """A sample-submission class that no training image has."""
    header, rows = c.submission()
    c.set_submission([[*r, "0.1"] for r in rows], [*header, "extra"])
    return c.spec.train_dir, None, f"class 'extra' of {c.spec.sample_submission} has no training images"


def duplicate_label_row(c: Comp) -> Expected:
    rows = c.labels()[1]
    c.set_labels(rows + [rows[7]])
    return str(c.spec.labels_csv), len(rows) + 2, f"duplicate id {c.train_rows()[7][0]} (first listed on row 9)"


def duplicate_train_and_test(c: Comp) -> Expected:
    image_id = c.train_rows()[0][0]
    shutil.copy(c.folder / c.train_image(0), c.folder / c.test_path(image_id))
    c.set_submission(c.submission()[1] + [c.submission_row(image_id)])
    return c.test_path(image_id), None, f"duplicate image id {image_id!r}: a train image too"


def wrong_labels_header(c: Comp) -> Expected:
    header, rows = c.labels()
    header[c.col(c.spec.label_column)] = "class"
    c.set_labels(rows, header)
    return str(c.spec.labels_csv), 1, f"header lacks column(s) {c.spec.label_column}"


def labels_row_with_missing_field(c: Comp) -> Expected:
    header, rows = c.labels()
    rows[2] = rows[2][:-1]
    c.set_labels(rows)
    return str(c.spec.labels_csv), 4, f"expected {len(header)} fields, got {len(header) - 1}"


def labels_in_latin1(c: Comp) -> Expected:
    """A spreadsheet's Latin-1 export: the first bad byte is named by row and byte offset."""
    header, rows = c.labels()
    c.set_labels([[*row, "café" if i == 3 else ""] for i, row in enumerate(rows)], [*header, "note"])
    path = c.folder / str(c.spec.labels_csv)
    data = path.read_text(encoding="utf-8").encode("latin-1")
    path.write_bytes(data)
    offset = data.index("é".encode("latin-1"))
    return str(c.spec.labels_csv), 5, f"not UTF-8 text: byte 0xe9 at byte offset {offset}"


def labels_in_utf16(c: Comp) -> Expected:
    """Excel's "Unicode Text": UTF-16 with a byte-order mark."""
    path = c.folder / str(c.spec.labels_csv)
    path.write_bytes(path.read_text(encoding="utf-8").encode("utf-16"))
    return str(c.spec.labels_csv), 1, "UTF-16 (little-endian) text, not UTF-8 (it starts with the byte-order mark ff fe)"


def submission_in_utf16_without_byte_order_mark(c: Comp) -> Expected:
    path = c.folder / c.spec.sample_submission
    path.write_bytes(path.read_text(encoding="utf-8").encode("utf-16-le"))
    return c.spec.sample_submission, 1, "not text: a NUL byte at byte offset 1 (UTF-16 without a byte-order mark?)"


def duplicated_submission_column(c: Comp) -> Expected:
    header, rows = c.submission()
    header[2] = header[1]
    c.set_submission(rows, header)
    return c.spec.sample_submission, 1, f"duplicated column(s) {header[1]}"


def submission_column_with_whitespace(c: Comp) -> Expected:
    header, rows = c.submission()
    header[2] += " "
    c.set_submission(rows, header)
    return c.spec.sample_submission, 1, f"column name {header[2]!r} is empty or has surrounding whitespace"


def submission_without_classes(c: Comp) -> Expected:
    header, rows = c.submission()
    c.set_submission([r[:2] for r in rows], header[:2])
    return c.spec.sample_submission, 1, "header must be an id column and at least two class columns"


def empty_test_set(c: Comp) -> Expected:
    shutil.rmtree(c.folder / c.spec.test_dir)
    (c.folder / c.spec.test_dir).mkdir()
    c.set_submission([])
    return c.spec.test_dir, None, "no test images (empty test set)"


def submission_id_not_a_test_image(c: Comp) -> Expected:
    rows = c.submission()[1]
    c.set_submission(rows + [c.submission_row(c.fresh_id(555))])
    return c.spec.sample_submission, len(rows) + 2, f"{c.fresh_id(555)} is not a test image"


def no_submission_row_for_a_test_image(c: Comp) -> Expected:
    rows = c.submission()[1]
    c.set_submission(rows[:-1])
    return c.spec.sample_submission, None, f"no row for test image {rows[-1][0]}"


def duplicate_submission_row(c: Comp) -> Expected:
    rows = c.submission()[1]
    c.set_submission(rows + [rows[1]])
    return c.spec.sample_submission, len(rows) + 2, f"duplicate id {rows[1][0]} (first listed on row 3)"


def submission_not_utf8_past_the_header(c: Comp) -> Expected:
    """A bad byte beyond the first read buffer (blank lines are skipped) must still be reported, at its row."""
    path = c.folder / c.spec.sample_submission
    data = path.read_bytes() + b"\n" * 20_000
    path.write_bytes(data + b"caf\xe9,0.1\n")
    return c.spec.sample_submission, data.count(b"\n") + 1, f"byte 0xe9 at byte offset {len(data) + 3}"


def missing_labels_file(c: Comp) -> Expected:
    (c.folder / str(c.spec.labels_csv)).unlink()
    return str(c.spec.labels_csv), None, "missing file"


def missing_sample_submission(c: Comp) -> Expected:
    (c.folder / c.spec.sample_submission).unlink()
    return c.spec.sample_submission, None, "missing file"


def id_with_whitespace(c: Comp) -> Expected:
    rows = c.labels()[1]
    rows[2][c.col(c.spec.id_column)] = " " + rows[2][c.col(c.spec.id_column)]
    c.set_labels(rows)
    return str(c.spec.labels_csv), 4, f"{c.spec.id_column} ' {c.train_rows()[2][0].strip()}' has leading or trailing whitespace"


def label_with_whitespace(c: Comp) -> Expected:
    rows = c.labels()[1]
    label = rows[3][c.col(c.spec.label_column)]
    rows[3][c.col(c.spec.label_column)] = label + " "
    c.set_labels(rows)
    return str(c.spec.labels_csv), 5, f"{c.spec.label_column} '{label} ' has leading or trailing whitespace"


def symlink_loop(c: Comp) -> Expected:
    rel = c.test_path(c.fresh_id(777))
    os.symlink(Path(rel).name, c.folder / rel)  # a link to itself
    return rel, None, "link loop"


def dangling_symlink(c: Comp) -> Expected:
    rel = c.test_path(c.fresh_id(778))
    os.symlink("../gone.jpg", c.folder / rel)
    return rel, None, "symbolic link to '../gone.jpg', which does not resolve"


def directory_symlink_loop(c: Comp) -> Expected:
    """A link back to a folder being copied: refused at the link, not followed ~40 levels deep."""
    folder = Path(c.train_image(0)).parent
    os.symlink("..", c.folder / folder / "loop")
    return f"{folder}/loop", None, "symbolic link loop"


def top_level_symlink_loop(c: Comp) -> Expected:
    (c.folder / c.spec.sample_submission).unlink()
    os.symlink(c.spec.sample_submission, c.folder / c.spec.sample_submission)
    return c.spec.sample_submission, None, f"symbolic link to '{c.spec.sample_submission}', which does not resolve"


def name_in_another_unicode_form(c: Comp) -> Expected:
    """The row says ``café…`` composed (NFC), the file is named decomposed (NFD, as macOS writes it): the
    two print alike, so the message must say what differs."""
    rows = c.labels()[1]
    image_id, label, _ = c.train_rows()[4]
    composed = "caf\u00e9" + image_id
    rows[4][c.col(c.spec.id_column)] = composed
    c.set_labels(rows)
    os.replace(c.folder / c.train_path(image_id, label),
               c.folder / c.train_path(unicodedata.normalize("NFD", composed), label))
    return str(c.spec.labels_csv), 6, f"differs from {ascii(composed)} (NFC) only in Unicode normalisation"


# Folder layout only: class folders.
def unknown_class_folder(c: Comp) -> Expected:
    """A class folder that the sample submission lacks."""
    (c.folder / c.spec.train_dir / UNKNOWN_CLASS).mkdir()
    (c.folder / c.spec.train_dir / UNKNOWN_CLASS / "img_998.jpg").write_bytes(jpeg_bytes(998))
    return f"{c.spec.train_dir}/{UNKNOWN_CLASS}", None, f"class folder '{UNKNOWN_CLASS}' is not a class column of sample_submission.csv"


def listed_under_other_class(c: Comp) -> Expected:
    os.replace(c.folder / "imgs/train/c1/img_1.jpg", c.folder / "imgs/train/c2/img_1.jpg")
    return "driver_imgs_list.csv", 3, "img_1.jpg is labelled c1 but lies in imgs/train/c2/"


def duplicate_across_class_folders(c: Comp) -> Expected:
    shutil.copy(c.folder / "imgs/train/c0/img_0.jpg", c.folder / "imgs/train/c1/img_0.jpg")
    return "imgs/train/c1/img_0.jpg", None, "duplicate image id 'img_0.jpg': also in imgs/train/c0/"


# Layouts with groups only (State Farm's drivers).
def group_with_whitespace(c: Comp) -> Expected:
    """``p000 `` beside ``p000`` would be two drivers, one possibly in train, one in validation."""
    rows = c.labels()[1]
    for row in rows[3:6]:
        row[c.col("subject")] += " "
    c.set_labels(rows)
    return "driver_imgs_list.csv", 5, "subject 'p000 ' has leading or trailing whitespace"


def blank_group(c: Comp) -> Expected:
    rows = c.labels()[1]
    rows[4][c.col("subject")] = "   "
    c.set_labels(rows)
    return "driver_imgs_list.csv", 6, "empty subject"


def groups_differing_in_case(c: Comp) -> Expected:
    rows = c.labels()[1]
    rows[12][c.col("subject")] = "P001"
    c.set_labels(rows)
    return "driver_imgs_list.csv", 14, "subject 'P001' differs only in case from 'p001' (row 12)"


BOTH, FOLDER = LAYOUTS, ("folder",)
BAD_INPUTS: list[tuple[Callable[[Comp], Expected], tuple[str, ...]]] = [
    (truncated_train_image, BOTH),
    (corrupt_test_image, BOTH),
    (png_named_jpg, BOTH),
    (text_file_among_test_images, BOTH),
    (listed_but_missing, BOTH),
    (present_but_unlisted, BOTH),
    (unknown_label, BOTH),
    (class_without_training_images, BOTH),
    (duplicate_label_row, BOTH),
    (duplicate_train_and_test, BOTH),
    (wrong_labels_header, BOTH),
    (labels_row_with_missing_field, BOTH),
    (labels_in_latin1, BOTH),
    (labels_in_utf16, BOTH),
    (submission_in_utf16_without_byte_order_mark, BOTH),
    (duplicated_submission_column, BOTH),
    (submission_column_with_whitespace, BOTH),
    (submission_without_classes, BOTH),
    (empty_test_set, BOTH),
    (submission_id_not_a_test_image, BOTH),
    (no_submission_row_for_a_test_image, BOTH),
    (duplicate_submission_row, BOTH),
    (submission_not_utf8_past_the_header, BOTH),
    (missing_labels_file, BOTH),
    (missing_sample_submission, BOTH),
    (id_with_whitespace, BOTH),
    (label_with_whitespace, BOTH),
    (symlink_loop, BOTH),
    (dangling_symlink, BOTH),
    (directory_symlink_loop, BOTH),
    (top_level_symlink_loop, BOTH),
    (name_in_another_unicode_form, BOTH),
    (unknown_class_folder, FOLDER),
    (listed_under_other_class, FOLDER),
    (duplicate_across_class_folders, FOLDER),
    (group_with_whitespace, FOLDER),
    (blank_group, FOLDER),
    (groups_differing_in_case, FOLDER),
]


@pytest.mark.parametrize(("layout", "break_input"), [
    pytest.param(layout, case, id=f"{layout}-{case.__name__}") for case, layouts in BAD_INPUTS for layout in layouts])
def test_bad_input_fails_cleanly(pristine, tmp_path, layout, break_input):
    """The error names the file (and row); nothing is written; a good earlier data/raw survives a
    failed re-run byte for byte; the CLI exits 2."""
    comp = make_comp(pristine, layout, tmp_path, "bad")
    file, row, problem = break_input(comp)
    with pytest.raises(BadInputError) as err:
        ingest.run(comp.cfg)
    assert err.value.file == comp.folder / file
    assert err.value.row == row
    assert str(err.value).startswith(f"{comp.folder / file}" + (f", row {row}:" if row else ":"))
    assert problem in err.value.problem
    assert not comp.raw.exists() and not comp.cfg.paths.path("hidden").exists()
    assert leftovers(comp.cfg) == []
    assert not comp.cfg.paths.stage_metrics_file("ingest").exists()

    good = make_comp(pristine, layout, tmp_path, "good")
    ingest.run(good.cfg)
    before = snapshot(comp.raw), snapshot(comp.cfg.paths.path("hidden"))
    assert cli_exit_code(comp.cfg, tmp_path) == 2
    assert (snapshot(comp.raw), snapshot(comp.cfg.paths.path("hidden"))) == before
    assert leftovers(comp.cfg) == []


def test_cli_reports_file_and_row(comp, tmp_path, capsys):
    unknown_label(comp)
    assert cli_exit_code(comp.cfg, tmp_path) == 2
    assert f"error: {comp.folder / comp.spec.labels_csv}, row 7: unknown {comp.spec.label_column}" in capsys.readouterr().err


def test_missing_source_folder(smoke_cfg, tmp_path):
    with pytest.raises(BadInputError, match="no such folder"):
        ingest.run(with_source(smoke_cfg, "dir", tmp_path / "nowhere"))


@pytest.mark.parametrize("member", ["../evil.txt", "/etc/evil.txt", "imgs/../../evil.txt"])
def test_zip_path_traversal_is_refused(statefarm, tmp_path, member):
    archive = zip_folder(statefarm.folder, tmp_path / "evil.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(member, "gotcha")
    cfg = with_source(statefarm.cfg, "zip", archive)
    with pytest.raises(BadInputError, match="unsafe member path") as err:
        ingest.run(cfg)
    assert err.value.file == archive
    assert not (tmp_path / "evil.txt").exists() and not cfg.paths.path("raw").exists()
    assert leftovers(cfg) == []


def test_zip_symlink_member_is_refused(statefarm, tmp_path):
    archive = zip_folder(statefarm.folder, tmp_path / "link.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo("imgs/test/img_200.jpg")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(BadInputError, match="symbolic link"):
        ingest.run(with_source(statefarm.cfg, "zip", archive))


@pytest.mark.parametrize("damage", ["not_a_zip", "truncated_zip"])
def test_damaged_zip(statefarm, tmp_path, damage):
    archive = zip_folder(statefarm.folder, tmp_path / "damaged.zip")
    if damage == "not_a_zip":
        archive.write_text("hello")
    else:
        truncate(archive)
    cfg = with_source(statefarm.cfg, "zip", archive)
    with pytest.raises(BadInputError) as err:
        ingest.run(cfg)
    assert err.value.file == archive
    assert cli_exit_code(cfg, tmp_path) == 2
    assert not cfg.paths.path("raw").exists() and leftovers(cfg) == []


def test_bad_image_inside_zip_is_named_by_zip_and_member(comp, tmp_path):
    rel = comp.train_image(9)
    truncate(comp.folder / rel)
    archive = zip_folder(comp.folder, tmp_path / "comp.zip")
    with pytest.raises(BadInputError) as err:
        ingest.run(with_source(comp.cfg, "zip", archive))
    assert err.value.file == archive / rel


def test_an_mpo_jpeg_is_an_image_not_a_corrupt_file(tmp_path):
    """Phone cameras write MPO (a JPEG with extra frames); it decodes as a JPEG and must not be refused."""
    from PIL import Image

    from pipeline.ingest.images import inspect_image

    path = tmp_path / "img_1.jpg"
    frames = [Image.new("RGB", (32, 24), (200, 30, 30)), Image.new("RGB", (32, 24), (30, 200, 30))]
    frames[0].save(path, format="MPO", save_all=True, append_images=frames[1:])
    with Image.open(path) as im:
        assert im.format == "MPO"
    assert inspect_image(str(path)).problem is None

