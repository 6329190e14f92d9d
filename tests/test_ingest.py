"""ingest: every source lands in data/raw verified and indexed; every bad input fails naming its file
(and CSV row), exits 2 through the CLI, and leaves no partial output."""

from __future__ import annotations

import csv
import io
import os
import random
import shutil
import sys
import types
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from pipeline import cli
from pipeline.config import CLASSES, Config, write_params
from pipeline.errors import BadInputError, StageError
from pipeline.io import read_json
from pipeline.stages import ingest

N_DRIVERS, N_TEST = 3, 5


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


def driver_rows(folder: Path) -> list[list[str]]:
    return read_csv(folder / ingest.DRIVER_CSV)[1:]


def set_driver_rows(folder: Path, rows: list[list[str]]) -> None:
    write_csv(folder / ingest.DRIVER_CSV, ingest.DRIVER_HEADER, rows)


def submission_rows(folder: Path) -> list[list[str]]:
    return read_csv(folder / ingest.SUBMISSION_CSV)[1:]


def set_submission_rows(folder: Path, rows: list[list[str]]) -> None:
    write_csv(folder / ingest.SUBMISSION_CSV, ingest.SUBMISSION_HEADER, rows)


def make_kaggle_folder(folder: Path) -> Path:
    """3 drivers x 10 classes x 1 train image, 5 test images, both CSVs: the competition in miniature.
    Train image n (row n + 2 of driver_imgs_list.csv) is img_n.jpg; test images are img_100..104."""
    rows = []
    for d in range(N_DRIVERS):
        for c in CLASSES:
            n = len(rows)
            path = folder / "imgs/train" / c / f"img_{n}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg_bytes(n))
            rows.append([f"p{d:03d}", c, f"img_{n}.jpg"])
    set_driver_rows(folder, rows)
    (folder / "imgs/test").mkdir(parents=True)
    tests = [f"img_{100 + i}.jpg" for i in range(N_TEST)]
    for i, img in enumerate(tests):
        (folder / "imgs/test" / img).write_bytes(jpeg_bytes(100 + i))
    set_submission_rows(folder, [[img] + ["0.1"] * 10 for img in tests])
    return folder


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, prefix + path.relative_to(folder).as_posix())
    return archive


def with_source(cfg: Config, source: str, path: Path | None = None, **extra) -> Config:
    update = {"source": source, "path": str(path) if path else None, **extra}
    return cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update=update)})


def leftovers(cfg: Config) -> list[str]:
    """Temp siblings of data/raw and data/hidden that a finished run must not leave."""
    data = cfg.paths.path("raw").parent
    return sorted(p.name for p in data.iterdir() if p.name.startswith(".")) if data.exists() else []


def cli_exit_code(cfg: Config, tmp_path: Path) -> int:
    params = tmp_path / "params.yaml"
    write_params(cfg, params)
    return cli.main(["ingest", "--params", str(params)])


@pytest.fixture
def kaggle_dir(tmp_path) -> Path:
    return make_kaggle_folder(tmp_path / "kaggle")


# ---------------------------------------------------------------------------- happy paths


def test_dir_source_writes_layout_indexes_and_figures(smoke_cfg, kaggle_dir):
    cfg = with_source(smoke_cfg, "dir", kaggle_dir)
    figures = ingest.run(cfg)
    raw = cfg.paths.path("raw")

    assert figures["n_train"] == N_DRIVERS * 10 and figures["n_test"] == N_TEST
    assert figures["n_drivers"] == N_DRIVERS and figures["n_quarantined"] == 0
    assert figures["per_driver_min"] == figures["per_driver_max"] == 10
    assert figures["source"] == "dir" and figures["seconds"] >= 0
    assert read_json(cfg.paths.stage_metrics_file("ingest")) == figures

    train_index = read_csv(raw / "train_index.csv")
    assert train_index[0] == ["img", "subject", "classname", "path"]
    assert [row[:3] for row in train_index[1:]] == [[img, s, c] for s, c, img in driver_rows(kaggle_dir)]
    for img, _, classname, path in train_index[1:]:
        assert path == f"imgs/train/{classname}/{img}" and (raw / path).is_file()
    test_index = read_csv(raw / "test_index.csv")
    assert test_index == [["img", "path"]] + [[f"img_{100 + i}.jpg", f"imgs/test/img_{100 + i}.jpg"] for i in range(N_TEST)]
    assert read_csv(raw / "quarantine.csv") == [["img", "path", "reason"]]
    assert (raw / ingest.DRIVER_CSV).read_bytes() == (kaggle_dir / ingest.DRIVER_CSV).read_bytes()
    assert (raw / ingest.SUBMISSION_CSV).is_file()
    assert "no hidden labels" in (cfg.paths.path("hidden") / "README.txt").read_text().lower()
    assert leftovers(cfg) == []


def test_dir_source_hardlinks_on_one_filesystem_and_copies_otherwise(smoke_cfg, kaggle_dir, monkeypatch):
    cfg = with_source(smoke_cfg, "dir", kaggle_dir)
    ingest.run(cfg)
    raw_img = cfg.paths.path("raw") / "imgs/train/c0/img_0.jpg"
    assert raw_img.stat().st_ino == (kaggle_dir / "imgs/train/c0/img_0.jpg").stat().st_ino

    def cross_device(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    ingest.run(cfg)  # a re-run replaces data/raw
    assert raw_img.stat().st_ino != (kaggle_dir / "imgs/train/c0/img_0.jpg").stat().st_ino
    assert raw_img.read_bytes() == (kaggle_dir / "imgs/train/c0/img_0.jpg").read_bytes()
    assert leftovers(cfg) == []


def test_relative_path_is_taken_from_the_project_root(smoke_cfg, kaggle_dir, tmp_path):
    cfg = with_source(smoke_cfg, "dir", kaggle_dir.relative_to(tmp_path))
    assert ingest.run(cfg)["n_train"] == N_DRIVERS * 10


@pytest.mark.parametrize("layout", ["flat", "wrapped", "nested_imgs_zip", "nested_bare_imgs_zip"])
def test_zip_source(smoke_cfg, kaggle_dir, tmp_path, layout):
    """The competition zip as Kaggle ships it (imgs/ + CSVs at top level), wrapped in a folder, or
    with the images in a nested imgs.zip (with or without the imgs/ prefix) and zipped CSVs."""
    archive = tmp_path / "state-farm-distracted-driver-detection.zip"
    if layout == "flat":
        zip_folder(kaggle_dir, archive)
    elif layout == "wrapped":
        zip_folder(kaggle_dir, archive, prefix="state-farm/")
    else:
        bundle = tmp_path / "bundle"
        bundle.mkdir()
        prefix = "imgs/" if layout == "nested_imgs_zip" else ""
        zip_folder(kaggle_dir / "imgs", bundle / "imgs.zip", prefix=prefix)
        for name in (ingest.DRIVER_CSV, ingest.SUBMISSION_CSV):
            with zipfile.ZipFile(bundle / f"{name}.zip", "w") as zf:
                zf.write(kaggle_dir / name, name)
        zip_folder(bundle, archive)

    cfg = with_source(smoke_cfg, "zip", archive)
    figures = ingest.run(cfg)
    raw = cfg.paths.path("raw")
    assert (figures["n_train"], figures["n_test"], figures["source"]) == (N_DRIVERS * 10, N_TEST, "zip")
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        ["imgs", ingest.DRIVER_CSV, ingest.SUBMISSION_CSV, "train_index.csv", "test_index.csv", "quarantine.csv"])
    assert (raw / "imgs/test/img_100.jpg").read_bytes() == (kaggle_dir / "imgs/test/img_100.jpg").read_bytes()
    assert leftovers(cfg) == []


def test_quarantine_mode_leaves_corrupt_images_out(smoke_cfg, kaggle_dir):
    truncate(kaggle_dir / "imgs/train/c3/img_3.jpg")
    garble(kaggle_dir / "imgs/test/img_102.jpg")
    cfg = with_source(smoke_cfg, "dir", kaggle_dir, on_corrupt="quarantine")
    figures = ingest.run(cfg)
    raw = cfg.paths.path("raw")

    assert figures["n_quarantined"] == 2
    assert figures["n_train"] == N_DRIVERS * 10 - 1 and figures["n_test"] == N_TEST - 1
    assert (figures["per_driver_min"], figures["per_driver_max"]) == (9, 10)
    quarantine = read_csv(raw / "quarantine.csv")
    assert [row[:2] for row in quarantine[1:]] == [
        ["img_3.jpg", "imgs/train/c3/img_3.jpg"], ["img_102.jpg", "imgs/test/img_102.jpg"]]
    assert all("corrupt" in row[2] for row in quarantine[1:])
    assert "img_3.jpg" not in {row[0] for row in read_csv(raw / "train_index.csv")}
    assert "img_102.jpg" not in {row[0] for row in read_csv(raw / "test_index.csv")}
    assert not (raw / "imgs/train/c3/img_3.jpg").exists() and not (raw / "imgs/test/img_102.jpg").exists()
    assert (kaggle_dir / "imgs/train/c3/img_3.jpg").exists()  # the source is never touched


def test_quarantine_does_not_excuse_non_jpeg_files(smoke_cfg, kaggle_dir):
    as_png(kaggle_dir / "imgs/train/c0/img_0.jpg")
    with pytest.raises(BadInputError, match="img_0.jpg: not a JPEG"):
        ingest.run(with_source(smoke_cfg, "dir", kaggle_dir, on_corrupt="quarantine"))


def test_image_pool_agrees_with_in_process_check(tmp_path, monkeypatch):
    good, bad = tmp_path / "good.jpg", tmp_path / "bad.jpg"
    good.write_bytes(jpeg_bytes(1, (64, 48)))
    bad.write_bytes(jpeg_bytes(2, (64, 48)))
    truncate(bad)
    paths = [str(good), str(bad)] * 3
    serial = list(ingest.inspect_images(paths))
    monkeypatch.setattr(ingest, "POOL_MIN_IMAGES", 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert list(ingest.inspect_images(paths)) == serial
    assert [p is None for p in serial] == [True, False] * 3


def test_synthetic_source(smoke_cfg):
    pytest.importorskip("pipeline.synthetic")
    cfg = with_source(smoke_cfg, "synthetic")
    figures = ingest.run(cfg)
    syn = cfg.ingest.synthetic
    assert figures["n_drivers"] == syn.n_train_drivers and figures["n_test"] == syn.n_test
    assert syn.train_per_driver[0] <= figures["per_driver_min"] <= figures["per_driver_max"] <= syn.train_per_driver[1]
    labels = read_csv(cfg.paths.path("hidden") / "test_labels.csv")
    assert labels[0] == ["img", "subject", "classname"]
    assert {row[0] for row in labels[1:]} == {row[0] for row in read_csv(cfg.paths.path("raw") / "test_index.csv")[1:]}
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


def test_kaggle_source_downloads_then_reads_the_zip(smoke_cfg, kaggle_dir, tmp_path, monkeypatch, capsys):
    isolate_from_kaggle_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret-key-123")
    calls: list = []
    archive = zip_folder(kaggle_dir, tmp_path / "download.zip")
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", fake_kaggle_client(archive, calls))
    cfg = with_source(smoke_cfg, "kaggle")
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
    path.write_bytes(ingest.JPEG_MAGIC + b"\x00junk" * 50)


def as_png(path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12)).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def drop_train_image(folder: Path) -> None:
    (folder / "imgs/train/c4/img_4.jpg").unlink()


def add_unlisted_image(folder: Path) -> None:
    (folder / "imgs/train/c0/img_999.jpg").write_bytes(jpeg_bytes(999))


def add_unknown_class_folder(folder: Path) -> None:
    (folder / "imgs/train/c10").mkdir()
    (folder / "imgs/train/c10/img_998.jpg").write_bytes(jpeg_bytes(998))


def relabel_unknown_class(folder: Path) -> None:
    rows = driver_rows(folder)
    rows[5][1] = "c11"
    set_driver_rows(folder, rows)


def move_to_other_class_folder(folder: Path) -> None:
    os.replace(folder / "imgs/train/c1/img_1.jpg", folder / "imgs/train/c2/img_1.jpg")


def duplicate_csv_row(folder: Path) -> None:
    rows = driver_rows(folder)
    set_driver_rows(folder, rows + [rows[7]])


def same_name_in_two_class_folders(folder: Path) -> None:
    shutil.copy(folder / "imgs/train/c0/img_0.jpg", folder / "imgs/train/c1/img_0.jpg")


def same_name_in_train_and_test(folder: Path) -> None:
    shutil.copy(folder / "imgs/train/c0/img_0.jpg", folder / "imgs/test/img_0.jpg")
    set_submission_rows(folder, submission_rows(folder) + [["img_0.jpg"] + ["0.1"] * 10])


def wrong_driver_header(folder: Path) -> None:
    write_csv(folder / ingest.DRIVER_CSV, ["img", "subject", "classname"], [[r[2], r[0], r[1]] for r in driver_rows(folder)])


def wrong_submission_header(folder: Path) -> None:
    write_csv(folder / ingest.SUBMISSION_CSV, ["image"] + list(CLASSES), submission_rows(folder))


def empty_test_set(folder: Path) -> None:
    shutil.rmtree(folder / "imgs/test")
    (folder / "imgs/test").mkdir()
    set_submission_rows(folder, [])


def png_renamed_jpg(folder: Path) -> None:
    as_png(folder / "imgs/test/img_101.jpg")


def text_file_in_imgs(folder: Path) -> None:
    (folder / "imgs/test/notes.txt").write_text("not an image")


def extra_submission_id(folder: Path) -> None:
    set_submission_rows(folder, submission_rows(folder) + [["img_555.jpg"] + ["0.1"] * 10])


def missing_submission_id(folder: Path) -> None:
    set_submission_rows(folder, submission_rows(folder)[:-1])


def missing_driver_csv(folder: Path) -> None:
    (folder / ingest.DRIVER_CSV).unlink()


# (id, break the fixture folder, file the message names, row it names, words of the problem)
BAD_INPUTS: list[tuple[str, Callable[[Path], None], str, int | None, str]] = [
    ("truncated_jpeg", lambda f: truncate(f / "imgs/train/c3/img_3.jpg"), "imgs/train/c3/img_3.jpg", None, "truncated"),
    ("corrupt_jpeg", lambda f: garble(f / "imgs/test/img_103.jpg"), "imgs/test/img_103.jpg", None, "corrupt JPEG"),
    ("listed_but_missing", drop_train_image, ingest.DRIVER_CSV, 6, "missing"),
    ("present_but_unlisted", add_unlisted_image, "imgs/train/c0/img_999.jpg", None, "not listed"),
    ("unknown_class_folder", add_unknown_class_folder, "imgs/train/c10", None, "unknown class folder"),
    ("unknown_classname", relabel_unknown_class, ingest.DRIVER_CSV, 7, "unknown classname 'c11'"),
    ("listed_under_other_class", move_to_other_class_folder, ingest.DRIVER_CSV, 3, "labelled c1 but lies in imgs/train/c2"),
    ("duplicate_csv_img", duplicate_csv_row, ingest.DRIVER_CSV, N_DRIVERS * 10 + 2, "duplicate img img_7.jpg"),
    ("duplicate_across_classes", same_name_in_two_class_folders, "imgs/train/c1/img_0.jpg", None, "duplicate image id"),
    ("duplicate_train_and_test", same_name_in_train_and_test, "imgs/test/img_0.jpg", None, "duplicate image id"),
    ("wrong_driver_header", wrong_driver_header, ingest.DRIVER_CSV, 1, "header must be exactly subject,classname,img"),
    ("wrong_submission_header", wrong_submission_header, ingest.SUBMISSION_CSV, 1, "header must be exactly img,c0"),
    ("empty_test_set", empty_test_set, "imgs/test", None, "no test images"),
    ("png_renamed_jpg", png_renamed_jpg, "imgs/test/img_101.jpg", None, "not a JPEG file (content: PNG"),
    ("text_file_in_imgs", text_file_in_imgs, "imgs/test/notes.txt", None, "not a JPEG"),
    ("submission_id_not_a_test_image", extra_submission_id, ingest.SUBMISSION_CSV, N_TEST + 2, "img_555.jpg is not a test image"),
    ("test_image_without_submission_row", missing_submission_id, ingest.SUBMISSION_CSV, None, "no row for test image img_104.jpg"),
    ("missing_driver_csv", missing_driver_csv, ingest.DRIVER_CSV, None, "missing file"),
]


@pytest.mark.parametrize(("break_input", "file", "row", "problem"), [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_fails_cleanly(smoke_cfg, tmp_path, break_input, file, row, problem):
    bad = make_kaggle_folder(tmp_path / "bad")
    break_input(bad)
    cfg = with_source(smoke_cfg, "dir", bad)

    with pytest.raises(BadInputError) as err:
        ingest.run(cfg)
    assert err.value.file == bad / file
    assert err.value.row == row
    assert str(err.value).startswith(f"{bad / file}" + (f", row {row}:" if row else ":"))
    assert problem in err.value.problem
    assert not cfg.paths.path("raw").exists() and not cfg.paths.path("hidden").exists()
    assert leftovers(cfg) == []
    assert not cfg.paths.stage_metrics_file("ingest").exists()

    # A good earlier output survives a failed re-run untouched; the CLI reports exit code 2.
    good_cfg = with_source(smoke_cfg, "dir", make_kaggle_folder(tmp_path / "good"))
    ingest.run(good_cfg)
    before = snapshot(cfg.paths.path("raw")), snapshot(cfg.paths.path("hidden"))
    assert cli_exit_code(cfg, tmp_path) == 2
    assert (snapshot(cfg.paths.path("raw")), snapshot(cfg.paths.path("hidden"))) == before
    assert leftovers(cfg) == []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_reports_file_and_row(smoke_cfg, kaggle_dir, tmp_path, capsys):
    relabel_unknown_class(kaggle_dir)
    assert cli_exit_code(with_source(smoke_cfg, "dir", kaggle_dir), tmp_path) == 2
    assert f"error: {kaggle_dir / ingest.DRIVER_CSV}, row 7: unknown classname" in capsys.readouterr().err


def test_missing_source_folder(smoke_cfg, tmp_path):
    with pytest.raises(BadInputError, match="no such folder"):
        ingest.run(with_source(smoke_cfg, "dir", tmp_path / "nowhere"))


@pytest.mark.parametrize("member", ["../evil.txt", "/etc/evil.txt", "imgs/../../evil.txt"])
def test_zip_path_traversal_is_refused(smoke_cfg, kaggle_dir, tmp_path, member):
    archive = zip_folder(kaggle_dir, tmp_path / "evil.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        zf.writestr(member, "gotcha")
    cfg = with_source(smoke_cfg, "zip", archive)
    with pytest.raises(BadInputError, match="unsafe member path") as err:
        ingest.run(cfg)
    assert err.value.file == archive
    assert not (tmp_path / "evil.txt").exists() and not cfg.paths.path("raw").exists()
    assert leftovers(cfg) == []


def test_zip_symlink_member_is_refused(smoke_cfg, kaggle_dir, tmp_path):
    archive = zip_folder(kaggle_dir, tmp_path / "link.zip")
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo("imgs/test/img_200.jpg")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(BadInputError, match="symbolic link"):
        ingest.run(with_source(smoke_cfg, "zip", archive))


@pytest.mark.parametrize("damage", ["not_a_zip", "truncated_zip"])
def test_damaged_zip(smoke_cfg, kaggle_dir, tmp_path, damage):
    archive = zip_folder(kaggle_dir, tmp_path / "damaged.zip")
    if damage == "not_a_zip":
        archive.write_text("hello")
    else:
        truncate(archive)
    cfg = with_source(smoke_cfg, "zip", archive)
    with pytest.raises(BadInputError) as err:
        ingest.run(cfg)
    assert err.value.file == archive
    assert cli_exit_code(cfg, tmp_path) == 2
    assert not cfg.paths.path("raw").exists() and leftovers(cfg) == []


def test_bad_image_inside_zip_is_named_by_zip_and_member(smoke_cfg, kaggle_dir, tmp_path):
    truncate(kaggle_dir / "imgs/train/c9/img_9.jpg")
    archive = zip_folder(kaggle_dir, tmp_path / "comp.zip")
    with pytest.raises(BadInputError) as err:
        ingest.run(with_source(smoke_cfg, "zip", archive))
    assert err.value.file == archive / "imgs/train/c9/img_9.jpg"
