"""Shared fixtures."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

DEMO_TEST_SIZE = 32


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """A script of this repository (train.py, benchmarks/…, scripts/…) imported as when it runs: its folder first on
    sys.path while it loads (a benchmark imports its neighbours), registered as ``name`` (default: its stem) in
    sys.modules (dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


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
