"""The stage command line: one writer per stage's outputs, and no stage outliving its parent."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.io import LockedError, exclusive_lock, remove_leftovers


def test_a_second_writer_of_the_same_outputs_is_refused_naming_the_holder(tmp_path):
    lock = tmp_path / ".locks" / "ingest.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pipeline.io import exclusive_lock\n"
        f"with exclusive_lock({str(lock)!r}, 'x'):\n    print('held', flush=True)\n    time.sleep(30)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"being written by pid {holder.pid}"):
            with exclusive_lock(lock, "stage ingest's outputs"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock, "stage ingest's outputs"):  # a killed holder leaves no stale lock
        pass


def test_a_stage_process_dies_with_its_parent(tmp_path):
    """Killing `dvc repro` (the parent) ends the stage it started, instead of leaving a writer behind."""
    pid_file = tmp_path / "child.pid"
    child_py = tmp_path / "child.py"
    child_py.write_text("import os, sys, time\nfrom pipeline.env import die_with_parent\ndie_with_parent()\n"
                        "open(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    parent_py = tmp_path / "parent.py"
    parent_py.write_text("import subprocess, sys, time\nsubprocess.Popen([sys.executable, sys.argv[1], sys.argv[2]])\n"
                         "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(parent_py), str(child_py), str(pid_file)])
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        child = int(pid_file.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(child, signal.SIGKILL)
            pytest.fail("the stage process outlived its killed parent")
    finally:
        parent.kill()


def test_leftovers_of_a_killed_run_are_removed(tmp_path):
    (tmp_path / ".raw.abc123.tmp" / "imgs").mkdir(parents=True)
    (tmp_path / ".raw.def456.scratch").mkdir()
    (tmp_path / ".raw.x.old").mkdir()
    (tmp_path / "raw").mkdir()
    (tmp_path / ".other.abc.tmp").mkdir()
    gone = remove_leftovers(tmp_path, "raw")
    assert len(gone) == 3 and sorted(p.name for p in tmp_path.iterdir()) == [".other.abc.tmp", "raw"]


