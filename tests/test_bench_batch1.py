"""benchmarks/bench_batch1.py's arithmetic: the merged model's token counts per block (the schedule's), and the
least-squares line."""

from pathlib import Path

import pytest
import torch
from conftest import load_script

import rmeeto
import rmeeto.reduction as R

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_batch1():
    return load_script(BENCHMARKS / "bench_batch1.py")  # it imports bench_cpu's table of sizes from beside it


def test_schedule_token_counts_are_the_tokens_each_block_of_a_merged_vim_sees():
    torch.manual_seed(0)
    vim = rmeeto.create_model("vim_demo", img_size=32, patch_size=4, embed_dim=32, depth=6, num_classes=5).eval()
    reducer = R.apply(vim, "rmeeto", r=5)
    seen = []
    for layer in vim.layers:
        layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    with torch.no_grad():
        vim(torch.randn(2, 3, 32, 32))
    assert [n for n, _ in reducer.schedule.token_counts(reducer.method, 65, len(vim.layers))] == seen
    assert seen[0] == 65 and seen[-1] < 65  # it merged


def test_line_recovers_intercept_and_slope(bench_batch1):
    xs = [20.0, 76.0, 197.0]
    assert bench_batch1.line(xs, [0.25 + 0.01 * x for x in xs]) == pytest.approx((0.25, 0.01))
