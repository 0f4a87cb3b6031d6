#!/usr/bin/env python
"""Build mamba-ssm's and causal-conv1d's CUDA extensions for one GPU architecture, from their sdists.

Their setup.py compiles for up to nine architectures (docs/cuda.md), which is most of a long install.
This compiles the same sources with the same nvcc flags for one architecture only (the local GPU's, or
``--arch``), through torch's JIT extension builder (ninja, ``MAX_JOBS``), both packages at once, and
lays out a folder to put first on ``PYTHONPATH``: the two Python packages and the two compiled modules.
Each module is imported once built, so a wrong torch or CUDA shows here as an import error. A run that
was stopped resumes where it was (ninja keeps the units already compiled); one run per ``--out`` at a time.

    python scripts/build_kernels.py mamba_ssm-2.3.2.post1.tar.gz causal_conv1d-1.7.0.tar.gz --out kernels
    PYTHONPATH=kernels python train.py ...
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tarfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# nvcc flags of both packages' setup.py (mamba-ssm 2.3.2, causal-conv1d 1.7.0), less their -gencode list, the
# --threads that only parallelises it, the register report and -std (torch's builder sets its own)
NVCC_FLAGS = [
    "-O3",
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "-lineinfo",
]


@dataclass(frozen=True)
class Extension:
    """One package's compiled module: its name and the folder (in the sdist) of its C++/CUDA sources."""

    package: str
    module: str
    csrc: str


EXTENSIONS = (
    Extension("mamba_ssm", "selective_scan_cuda", "csrc/selective_scan"),
    Extension("causal_conv1d", "causal_conv1d_cuda", "csrc"),
)


def unpack(sdist: Path, into: Path) -> Path:
    """The source tree of ``sdist`` (a .tar.gz, or a folder already unpacked)."""
    if sdist.is_dir():
        return sdist
    with tarfile.open(sdist) as tar:
        tops = {name.split("/")[0] for name in tar.getnames()}
        if len(tops) != 1:
            raise SystemExit(f"{sdist}: expected one top-level folder, found {sorted(tops)}")
        tar.extractall(into, filter="data")
    return into / tops.pop()


def find_extension(tree: Path) -> Extension:
    """Which of the two packages ``tree`` holds; exits naming the tree when neither."""
    for ext in EXTENSIONS:
        if (tree / ext.package / "__init__.py").is_file() and (tree / ext.csrc).is_dir():
            return ext
    raise SystemExit(f"{tree}: neither {' nor '.join(e.package for e in EXTENSIONS)} (with its csrc) is in it")


def sources(tree: Path, ext: Extension) -> list[Path]:
    """The extension's sources, as its setup.py lists them: every .cpp and .cu of its csrc folder."""
    found = sorted((tree / ext.csrc).glob("*.cpp")) + sorted((tree / ext.csrc).glob("*.cu"))
    if not found:
        raise SystemExit(f"{tree / ext.csrc}: no .cpp or .cu sources")
    return found


def compile_extension(tree: Path, ext: Extension, arch: str, build: Path) -> Path:
    """Compile and import ``ext`` for compute capability ``arch`` ("9.0"); the built module's path."""
    from torch.utils.cpp_extension import load

    sm = arch.replace(".", "")
    build.mkdir(parents=True, exist_ok=True)
    # torch's builder waits, without end, for a lock file that a killed build leaves behind; each --out
    # folder is built by one run at a time, so a lock found here is stale
    (build / "lock").unlink(missing_ok=True)
    module = load(
        name=ext.module,
        sources=[str(s) for s in sources(tree, ext)],
        extra_include_paths=[str(tree / ext.csrc)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=[*NVCC_FLAGS, f"-gencode=arch=compute_{sm},code=sm_{sm}"],
        build_directory=str(build),
        verbose=True,
    )
    return Path(module.__file__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdists", nargs="+", type=Path, help="mamba-ssm / causal-conv1d sdists (.tar.gz or folders)")
    parser.add_argument("--out", type=Path, required=True, help="folder to put first on PYTHONPATH")
    parser.add_argument("--arch", help="compute capability, e.g. 9.0 (default: the local GPU's)")
    args = parser.parse_args()
    if args.arch is None:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device to read the architecture from: pass --arch")
        args.arch = "{}.{}".format(*torch.cuda.get_device_capability())
    trees = [unpack(s, args.out / "src") for s in args.sdists]
    plan = [(tree, find_extension(tree)) for tree in trees]
    # spawn: the parent may have initialised CUDA (reading the architecture)
    with ProcessPoolExecutor(len(plan), mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(compile_extension, t, e, args.arch, args.out / "build" / e.module) for t, e in plan]
        built = [job.result() for job in jobs]
    for (tree, ext), so in zip(plan, built, strict=True):
        shutil.copytree(tree / ext.package, args.out / ext.package, dirs_exist_ok=True)
        shutil.copy2(so, args.out / so.name)
        print(f"{ext.package}: {ext.module} for sm_{args.arch.replace('.', '')} -> {args.out / so.name}")


if __name__ == "__main__":
    main()
