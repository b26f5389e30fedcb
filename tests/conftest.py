"""Shared fixtures: the offline data root and quiet, fast trainer settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def data_root() -> Path | None:
    """The real data sets (CI sets CLFRAME_DATA to the data directory); None when absent."""
    root = os.environ.get("CLFRAME_DATA")
    return Path(root) if root and Path(root).is_dir() else None


requires_data = pytest.mark.skipif(data_root() is None, reason="set CLFRAME_DATA to the offline data folder")

QUIET_TRAINER = {"enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False}


@pytest.fixture(autouse=True, scope="session")
def _decoded_data_cache(tmp_path_factory: pytest.TempPathFactory):
    """Decoded-data cache entries go to a folder of this session (shared by its tests and their child processes),
    not the user's cache; set CLFRAME_CACHE yourself to keep them between sessions."""
    if os.environ.get("CLFRAME_CACHE"):
        yield
        return
    os.environ["CLFRAME_CACHE"] = str(tmp_path_factory.mktemp("clframe_cache"))
    yield
    os.environ.pop("CLFRAME_CACHE", None)


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    """Tiny models and thousands of small tensor ops run fastest on one thread, and stay fast on a busy host."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
