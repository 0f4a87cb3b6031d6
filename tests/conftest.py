"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

DEMO_TEST_SIZE = 32


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with the digits demo shards at 32x32 (``train``: 1437 samples in 4 shards, ``val``: 360 in 2)."""
    from rmeeto.data.demo import ensure_demo_shards  # imported here: collecting other tests stays light

    return ensure_demo_shards(tmp_path_factory.mktemp("demo_shards"), size=DEMO_TEST_SIZE)


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run fastest single-threaded (``pytestmark`` of such modules)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
