"""Offline hygiene for the tools we drive (docs/design.md#offline-hygiene); set wherever the project runs them."""

from __future__ import annotations

import contextlib
import os
import sys

OFFLINE_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations otherwise checks PyPI on import
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # a local server takes 10-15 s here
    "TOKENIZERS_PARALLELISM": "false",
}


def set_offline_env(hub_offline: bool | None = None) -> None:
    """Set the hygiene variables unless the user already chose a value."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if hub_offline is None:
        hub_offline = os.environ.get("STATEFARM_ONLINE", "0") != "1"
    if hub_offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def die_with_parent(parent_pid: int | None = None) -> None:
    """Linux: end this process when its parent dies (a stage under ``dvc repro`` or a flow, a pool worker
    under its stage), so killing the run never leaves a writer or a worker running on behind its back.
    ``parent_pid`` (a pool worker's initializer argument): exit at once if the parent already died while
    this process was starting, before the signal was armed."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
