"""pipeline.io: atomic writes leave complete files with the modes open()/mkdir give under the umask
(tempfile's 0600/0700 must not survive the rename), and no temp sibling behind."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from pipeline.io import (
    _tmp_sibling_dir,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    remove_leftovers,
)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@pytest.mark.parametrize("write", [
    lambda p: atomic_write_text(p, "a: 1\n"),
    lambda p: atomic_write_bytes(p, b"\x00\x01"),
    lambda p: atomic_write_json(p, {"a": 1}),
    lambda p: atomic_write_csv(p, pd.DataFrame({"img": ["a.jpg"], "c0": [0.5]})),
], ids=["text", "bytes", "json", "csv"])
def test_atomic_files_get_0644_under_umask_022(tmp_path, umask_022, write):
    path = tmp_path / "out" / "file.csv"
    write(path)
    assert mode(path) == 0o644
    assert siblings(path) == []
    write(path)  # replacing an existing file: the new one gets the normal mode too
    assert mode(path) == 0o644


def test_atomic_path_follows_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        with atomic_path(tmp_path / "private.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert mode(tmp_path / "private.txt") == 0o600


def test_atomic_dir_gets_0755_and_its_files_0644_under_umask_022(tmp_path, umask_022):
    target = tmp_path / "models" / "head"
    for text in ("first", "second"):  # the second swaps out an existing folder
        with atomic_dir(target) as tmp:
            (tmp / "weights.txt").write_text(text)
            atomic_write_text(tmp / "meta.json", "{}")
        assert mode(target) == 0o755
        assert mode(target / "weights.txt") == 0o644
        assert mode(target / "meta.json") == 0o644
        assert (target / "weights.txt").read_text() == text
        assert siblings(target) == []


def test_a_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "preds.csv"
    with pytest.raises(RuntimeError), atomic_path(path):
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "folder"):
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_remove_leftovers_finds_the_temp_siblings_a_killed_write_leaves(tmp_path):
    path = tmp_path / "folder"
    made = [_tmp_sibling_dir(path, ".tmp"), _tmp_sibling_dir(path, ".old")]
    assert all(p.is_dir() and p.name.startswith(".folder.") for p in made)
    assert sorted(remove_leftovers(tmp_path, path.name)) == sorted(made)
    assert list(tmp_path.iterdir()) == []


def test_a_waiting_lock_is_taken_as_soon_as_a_killed_holder_dies(tmp_path):
    """The flows' DVC slot: a second run waits (saying so once) and gets the lock the moment the holder
    dies, even by SIGKILL (a Prefect concurrency slot stayed leased to a killed flow)."""
    import signal
    import subprocess
    import sys
    import time

    from pipeline.io import exclusive_lock

    lock = tmp_path / ".locks/dvc-run.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pipeline.io import exclusive_lock\n"
                               f"with exclusive_lock({str(lock)!r}, 'slot'):\n    print('held', flush=True)\n"
                               "    time.sleep(600)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waits: list[str] = []
        killed_at = None

        def on_wait(who: str) -> None:
            nonlocal killed_at
            waits.append(who)
            holder.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()

        with exclusive_lock(lock, "slot", on_wait=on_wait, poll_s=0.1):
            assert waits == [f"pid {holder.pid}"]
            assert time.monotonic() - killed_at < 5
            assert lock.read_text() == f"pid {os.getpid()}"
    finally:
        holder.kill()
