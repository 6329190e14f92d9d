"""Files into the build folder: hardlink-or-copy of a competition folder (symbolic links followed,
link loops refused), moving unpacked entries in by rename, and safe extraction of the competition zip
and the zips it ships inside."""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from pipeline.errors import BadInputError


class LinkOrCopy:
    """copytree's copy function: hardlink while source and target share a filesystem (the real data is
    ~4 GB), copy once linking fails (another filesystem, or one without hardlinks). A symbolic link is
    replaced by its target (os.link would link the link itself, which may not resolve from data/raw);
    one that does not resolve is an error naming it, before it could turn linking into copying."""

    def __init__(self) -> None:
        self.can_link = True

    def __call__(self, src: str | Path, dst: str | Path) -> str | Path:
        if os.path.islink(src):
            if not os.path.exists(src):
                raise BadInputError(src, f"symbolic link to {os.readlink(src)!r}, which does not resolve "
                                         "(missing, or a link loop)")
            src = os.path.realpath(src)
        if self.can_link:
            try:
                os.link(src, dst)
                return dst
            except OSError:
                self.can_link = False
        return shutil.copy2(src, dst)


def link_layout(folder: Path, build: Path, entries: tuple[str, ...]) -> None:
    """Hardlink (or copy) the competition's entries of ``folder``; missing ones are reported by verify.
    Symbolic links are followed; one that does not resolve (missing target, a loop) is an error
    naming it."""
    link = LinkOrCopy()
    for name in entries:
        src = folder / name
        if src.is_dir():
            try:
                shutil.copytree(src, build / name, copy_function=link, ignore=refuse_link_loops(src))
            except shutil.Error as err:
                bad, _dst, why = err.args[0][0]
                raise BadInputError(bad, f"cannot be read ({why}): a broken symbolic link or a link loop?") from None
        elif src.is_file() or src.is_symlink():
            link(src, build / name)


def refuse_link_loops(top: Path) -> Callable[[str, list[str]], set[str]]:
    """copytree's ``ignore`` hook, ignoring nothing: a symbolic link to a folder that holds a folder
    being copied is refused, naming the link (copytree would follow it ~40 levels deep, copying the
    tree again at each level, and then name the 40-level path)."""

    def check(folder: str, names: list[str]) -> set[str]:
        for name in names:
            path = os.path.join(folder, name)
            if not (os.path.islink(path) and os.path.isdir(path)):
                continue
            target = Path(os.path.realpath(path))
            parts = Path(folder).relative_to(top).parts
            copying = [Path(os.path.realpath(top.joinpath(*parts[:i]))) for i in range(len(parts) + 1)]
            if any(target == p or target in p.parents for p in copying):
                raise BadInputError(path, f"symbolic link loop: it links to {target}, which contains it")
        return set()

    return check


def move_layout(root: Path, build: Path, entries: tuple[str, ...]) -> None:
    for name in entries:
        if (root / name).exists():
            os.replace(root / name, build / name)


def find_layout_root(folder: Path, entries: tuple[str, ...]) -> Path:
    """The folder holding the competition's entries (or their zips); some archives wrap all in one top folder."""
    current = folder
    for _ in range(3):
        if any((current / name).exists() for name in entries) or any(current.glob("*.zip")):
            return current
        subdirs = [p for p in current.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX"))]
        if len(subdirs) != 1:
            break
        current = subdirs[0]
    return folder


# ---------------------------------------------------------------------------- zip


def unpack_competition_zip(archive: Path, dest: Path, entries: tuple[str, ...]) -> None:
    """Extract the competition zip, then any zips it ships inside (Kaggle's older bundle has
    ``imgs.zip``, ``driver_imgs_list.csv.zip`` and ``sample_submission.csv.zip``)."""
    safe_extract(archive, dest, archive)
    root = find_layout_root(dest, entries)
    for inner in sorted(root.glob("*.zip")):
        label = archive / inner.name
        # An inner zip named after a folder of the layout (State Farm's imgs.zip) holds that folder's contents.
        folder = inner.stem in entries and not zip_has_top_folder(inner, inner.stem, label)
        target = root / inner.stem if folder else root
        safe_extract(inner, target, label)
        inner.unlink()


def open_zip(path: Path, label: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise BadInputError(label, f"not a readable zip archive ({err})") from None


def zip_has_top_folder(path: Path, folder: str, label: Path) -> bool:
    with open_zip(path, label) as zf:
        return any(name.replace("\\", "/").split("/", 1)[0] == folder for name in zf.namelist())


def safe_extract(path: Path, dest: Path, label: Path) -> None:
    """Extract every member under ``dest``, refusing members that would land outside it (absolute
    paths, ``..``), symbolic links, and names that repeat (a repeated image would be silently lost)."""
    with open_zip(path, label) as zf:
        for info in zf.infolist():
            if info.filename.startswith("__MACOSX/"):  # macOS resource forks, not data
                continue
            target = member_target(dest, info.filename, label)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise BadInputError(label, f"member {info.filename!r} is a symbolic link")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, open(target, "xb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except FileExistsError:
                raise BadInputError(label, f"member {info.filename!r} appears twice") from None
            except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError) as err:
                raise BadInputError(label, f"member {info.filename!r} is damaged ({err})") from None


def member_target(dest: Path, name: str, label: Path) -> Path:
    normalized = name.replace("\\", "/")
    parts = PurePosixPath(normalized).parts
    if not parts or normalized.startswith("/") or ".." in parts or ":" in parts[0]:
        raise BadInputError(label, f"unsafe member path {name!r} (absolute or escaping the archive)")
    return dest.joinpath(*parts)
