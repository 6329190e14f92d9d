"""Atomic artifact writing: every output goes to a temp sibling first, then is renamed into place,
so a killed stage never leaves a half-written file or folder that a later stage would trust."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import StageError


class LockedError(StageError):
    """Another process is writing the same outputs."""


def _new_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _unique_sibling(path: Path, suffix: str, create: Callable[[Path], None]) -> Path:
    """A new ``.<name>.<random><suffix>`` next to ``path``, made by ``create`` (exclusive). Not
    tempfile.mkstemp/mkdtemp: their 0600/0700 modes would survive the rename, so outputs get what
    open()/mkdir give under the umask (0644/0755 under umask 022)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name next to {path}")


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    return _unique_sibling(path, f".tmp{suffix}", _new_file)


def _tmp_sibling_dir(path: Path, suffix: str) -> Path:
    return _unique_sibling(path, suffix, lambda candidate: os.mkdir(candidate, 0o777))


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp file path next to ``path``; on success rename it onto ``path``, else delete it."""
    path = Path(path)
    tmp = _tmp_sibling(path, path.suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: Path | str, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_csv(path: Path | str, df: pd.DataFrame, **kwargs: Any) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, **kwargs)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Build a folder in a temp sibling; on success swap it in for ``path`` (replacing any old one)."""
    path = Path(path)
    tmp = _tmp_sibling_dir(path, ".tmp")
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            old = _tmp_sibling_dir(path, ".old")
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (weights files run to hundreds of MB)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def exclusive_lock(path: Path | str, what: str, on_wait: Callable[[str], None] | None = None,
                   poll_s: float = 1.0) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing): two writers of the same outputs
    (a second ``dvc repro`` after a stale DVC lock was cleared, two flows) must never interleave. Held
    elsewhere, fail at once, or with ``on_wait`` (called once with the holder) wait for it. The lock dies
    with its process, so a killed run leaves nothing to clear and blocks nobody."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:  # not inherited by child processes (PEP 446)
        waited = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                if on_wait is None:
                    raise LockedError(f"{what} is being written by {holder} (lock {path}): wait for it or stop it") from None
                if not waited:  # say it once
                    on_wait(holder)
                    waited = True
                time.sleep(poll_s)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_leftovers(folder: Path, name: str) -> list[Path]:
    """Temp siblings of ``folder/name`` that a killed run left (``.name.*.tmp``, ``.old``, ``.scratch``);
    called by the one writer holding the stage's lock, so none of them is in use."""
    gone = []
    for leftover in Path(folder).glob(f".{name}.*"):
        if leftover.name.endswith((".tmp", ".old", ".scratch")):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
            gone.append(leftover)
    return gone
