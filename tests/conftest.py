"""Shared fixtures: tests shrink the real `smoke` profile and write under tmp dirs."""

from __future__ import annotations

import os

import pytest

from pipeline.config import Config, load_profile
from pipeline.env import set_offline_env

set_offline_env()
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def smoke_cfg(tmp_path) -> Config:
    """The smoke profile with every artifact path under a fresh tmp dir."""
    return load_profile("smoke").at(tmp_path)
