"""scripts/build_kernels.py: what it compiles from an sdist, and with which architecture flag (the compile
itself needs nvcc and a CUDA torch)."""

import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.utils.cpp_extension
from conftest import load_script

SCRIPT = Path(__file__).parents[1] / "scripts" / "build_kernels.py"
bk = load_script(SCRIPT)


def _sdist(tmp_path: Path, files: list[str], name: str = "causal_conv1d-1.7.0") -> Path:
    src = tmp_path / "make" / name
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_text("// x\n")
    sdist = tmp_path / f"{name}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname=name)
    return sdist


def test_unpacks_and_finds_the_package_and_its_sources(tmp_path):
    files = ["causal_conv1d/__init__.py", "csrc/causal_conv1d.cpp", "csrc/fwd.cu", "csrc/bwd.cu", "csrc/x.h"]
    tree = bk.unpack(_sdist(tmp_path, files), tmp_path / "out")
    ext = bk.find_extension(tree)
    assert (ext.package, ext.module) == ("causal_conv1d", "causal_conv1d_cuda")
    assert [s.name for s in bk.sources(tree, ext)] == ["causal_conv1d.cpp", "bwd.cu", "fwd.cu"]


def test_an_unknown_tree_is_named(tmp_path):
    tree = bk.unpack(_sdist(tmp_path, ["other/__init__.py", "csrc/a.cu"], "other-1.0"), tmp_path / "out")
    with pytest.raises(SystemExit, match="other-1.0: neither mamba_ssm nor causal_conv1d"):
        bk.find_extension(tree)


def test_compiles_for_the_one_architecture_asked_past_a_stale_lock(tmp_path, monkeypatch):
    tree = bk.unpack(_sdist(tmp_path, ["causal_conv1d/__init__.py", "csrc/a.cpp", "csrc/b.cu"]), tmp_path / "out")
    lock = tmp_path / "build" / "lock"  # left by a killed build: torch's load would wait for it forever
    lock.parent.mkdir()
    lock.touch()
    seen = {}

    def load(**kwargs):
        seen.update(kwargs, locked=lock.exists())
        return SimpleNamespace(__file__=str(tmp_path / "causal_conv1d_cuda.so"))

    monkeypatch.setattr(torch.utils.cpp_extension, "load", load)
    built = bk.compile_extension(tree, bk.find_extension(tree), "9.0", tmp_path / "build")
    assert built.name == "causal_conv1d_cuda.so" and seen["name"] == "causal_conv1d_cuda" and not seen["locked"]
    assert [f for f in seen["extra_cuda_cflags"] if "arch" in f] == ["-gencode=arch=compute_90,code=sm_90"]
    assert [Path(s).name for s in seen["sources"]] == ["a.cpp", "b.cu"]
