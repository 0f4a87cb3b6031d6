"""benchmarks/bench_cpu.py's count of matrix products, which its GEMM-roof column rests on."""

import math
from pathlib import Path

import pytest
import torch
from conftest import load_script

import rmeeto
import rmeeto.reduction as R

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "bench_cpu.py"


def bench_cpu():
    return load_script(SCRIPT)


def products(tokens: list[int], c: int, n: int, classes: int) -> int:
    """Multiply-accumulates of a Vim's linears per image, block i seeing tokens[i] tokens: in_proj, each
    direction's x_proj and dt_proj, out_proj; the head on the cls token."""
    di, rank = 2 * c, math.ceil(c / 16)
    per_token = c * 2 * di + 2 * (di * (rank + 2 * n) + rank * di) + di * c
    return sum(tokens) * per_token + c * classes


@pytest.mark.parametrize("merged", [False, True])
def test_matmul_gmacs_counts_every_product_of_the_model_once(merged):
    """dt_proj's products (inside the scan kernel on the cpu backend) and the merges' scores (inside the merge
    kernel) count, the merge kernel's one-time checks against torch's products do not."""
    torch.manual_seed(0)
    vim = rmeeto.create_model("vim_demo", img_size=32, patch_size=4, embed_dim=32, depth=4, num_classes=5).eval()
    tokens = [65] * 4
    if merged:
        R.apply(vim, "rmeeto", r=6, blocks=[2])
        tokens = [65, 65, 59, 59]
    expected = products(tokens, 32, vim.cfg.d_state, 5) + merged * (65 // 2) * (64 // 2) * 32  # scores: Na × Nb × C
    assert bench_cpu().matmul_gmacs(vim, torch.randn(2, 3, 32, 32)) * 1e9 == pytest.approx(expected, rel=1e-9)
