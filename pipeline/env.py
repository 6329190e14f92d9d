"""Offline hygiene for the tools we drive (design.md section 5); set wherever the project runs them."""

from __future__ import annotations

import os

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
