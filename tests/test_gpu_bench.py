"""benchmarks/gpu.py runs end to end in its tiny CPU configuration (the GPU numbers need a GPU)."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu.py"


def test_gpu_benchmark_tiny_runs_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}  # this checkout's rmeeto
    out = subprocess.run([sys.executable, str(SCRIPT), "--tiny"], capture_output=True, text=True, check=True,
                         env=env).stdout  # fmt: skip
    lines = out.splitlines()
    assert lines[0].startswith("scan backend: ")
    for kind in ("unreduced", "rmeeto", "mtr"):
        assert any(line.startswith(f"parity torch vs ref, {kind}: max rel diff logits ") and "gradients" in line
                   and line.endswith("(ok)") for line in lines)  # fmt: skip
    for kind in ("unreduced", "rmeeto", "mtr"):
        assert any(line.startswith("infer torch ") and f" {kind} " in line and "img/s" in line for line in lines)
    assert any(line.startswith("infer torch compiled") for line in lines)
    assert sum(line.startswith("train torch") for line in lines) == 2


def test_kernels_only_without_the_kernels_says_so():
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])}
    run = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--kernels-only"], capture_output=True, text=True,
                         env=env)  # fmt: skip
    assert run.returncode == 2 and "--kernels-only, but the cuda backend is unavailable" in run.stderr
