#!/usr/bin/env python
"""Vim against timm's DeiT of the same size (timed as plain timm) on this CPU, inference and training.

For each size (Ti, S, B): the Vim, the Vim with R-MeeTo at the paper's r, and DeiT, timed in one
interleaved run (:func:`rmeeto.speed.interleaved`), fp32, 224×224, random weights (speed does not depend
on them). Forward at batch 8 and batch 1; a training step (forward, cross-entropy, backward, AdamW) at
batch 8. Printed: ms per call, img/s, each model's speed relative to DeiT (median of per-round ratios
and its interquartile range), the measured speedup of R-MeeTo over its FLOPs ratio, and the roofline:
this machine's GEMM GFLOP/s (timed here, at a Vim-S in_proj size) times each model's matmul work.

    .venv/bin/python benchmarks/bench_cpu.py [--sizes tiny small base] [--threads 2] [--no-train]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import rmeeto
import rmeeto.reduction as R
from rmeeto.flops import count
from rmeeto.models.deit import ReducibleViT
from rmeeto.ops import backend_summary, use_backend
from rmeeto.speed import Speed, interleaved

SIZES = {  # Vim name, R-MeeTo r (the paper's), DeiT name
    "tiny": ("vim_tiny_patch16_224_midclstok", 5, "deit_tiny_patch16_224"),
    "small": ("vim_small_patch16_224_midclstok", 11, "deit_small_patch16_224"),
    "base": ("vim_base_patch16_224_midclstok", 11, "deit_base_patch16_224"),
}


MATMULS = ("mm", "addmm", "bmm", "baddbmm")


def matmul_gmacs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates (G) per image in the model's matrix products on input x (B×3×H×W): every
    mm/addmm/bmm torch runs (torch.utils.flop_counter), attention included (timm's fused attention is
    switched off while counting, as the counter does not see inside it). Counted on the `ref` backend (its scan
    makes no products of its own, the `torch` one's do), so that the products the cpu kernels make themselves
    (dt_proj's inside the scan, the merges' scores) count too and their one-time checks against torch's products
    (rmeeto.reduction.merge_cpu.kernel_scores) do not."""
    fused = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for m, _ in fused:
        m.fused_attn = False
    try:
        with torch.no_grad(), use_backend("ref"), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for m, flag in fused:
            m.fused_attn = flag
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if op.__name__.split(".")[0] in MATMULS) / 2e9 / len(x)


def gemm_gflops() -> float:
    """This machine's fp32 GEMM rate (GFLOP/s, 2 per multiply-add) at a Vim-S in_proj size (1576×384 @ 384×1536)."""
    a, b = torch.randn(1576, 384), torch.randn(384, 1536)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(20):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1576 * 384 * 1536 / best / 1e9


def train_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """One forward + cross-entropy + backward + AdamW step on x (lr 0: the weights stay as they are); the fused
    AdamW, as rmeeto's training pipeline runs it."""
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)
    target = torch.zeros(len(x), dtype=torch.long)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()

    return step


def report(title: str, labels: list[str], speeds: list[Speed], batch: int, roof_ms: list[float]) -> None:
    """One table: ms per call, img/s (±IQR), speed relative to the first row (DeiT), ms at the GEMM roofline."""
    print(f"\n{title}")
    print(f"{'model':<26} {'ms/call':>9} {'img/s':>8} {'±IQR':>5} {'x DeiT':>7} {'±IQR':>5} {'GEMM-roof ms':>13}")
    for label, s, roof in zip(labels, speeds, roof_ms, strict=True):
        print(f"{label:<26} {1e3 * batch / s.images_per_s:>9.1f} {s.images_per_s:>8.2f} {s.spread:>5.0%} "
              f"{s.speedup:>7.3f} {s.speedup_spread:>5.0%} {roof:>13.1f}")


def bench_size(size: str, gflops: float, batch: int, reps: int, train: bool) -> None:
    """All tables of one size: inference at ``batch`` and 1, and (``train``) the training step."""
    vim_name, r, deit_name = SIZES[size]
    vim, deit = rmeeto.create_model(vim_name).eval(), timm.create_model(deit_name).eval()
    reducer = R.apply(vim, "rmeeto", r=r)
    short = vim_name.split("_patch")[0]
    labels = [deit_name, short, f"{short} R-MeeTo r={r}"]
    x8 = torch.randn(batch, 3, 224, 224)
    R.attach(vim, None)
    gflop = [count(ReducibleViT(deit)), count(vim)]
    mm = [matmul_gmacs(deit, x8[:1]), matmul_gmacs(vim, x8[:1])]
    R.attach(vim, reducer)
    gflop.append(count(vim))
    mm.append(matmul_gmacs(vim, x8[:1]))
    print(f"\n== {size}: GFLOPs {' / '.join(f'{g:.2f}' for g in gflop)}, matmul GMACs "
          f"{' / '.join(f'{m:.2f}' for m in mm)} ({', '.join(labels)})")

    def runs(step: Callable[[nn.Module, torch.Tensor], object], x: torch.Tensor) -> list[Callable[[], object]]:
        """DeiT, the Vim, the merged Vim: each a call of ``step(model, x)``."""
        def with_reducer(red):
            def run():
                R.attach(vim, red)
                return step(vim, x)
            return run
        return [lambda: step(deit, x), with_reducer(None), with_reducer(reducer)]

    def roof(n: int) -> list[float]:
        return [2e3 * m * n / gflops for m in mm]

    forward = torch.no_grad()(lambda model, x: model(x))
    for n in (batch, 1):
        with rmeeto.frozen(vim):  # inference with fixed weights, as a user would run it (see rmeeto.frozen)
            speeds = interleaved(runs(forward, x8[:n]), n, reps=reps)
        report(f"{size}: inference, batch {n}", labels, speeds, n, roof(n))
        speedup = speeds[2].speedup / speeds[1].speedup
        print(f"R-MeeTo over the unreduced Vim: {speedup:.3f}× measured for a FLOPs ratio of "
              f"{gflop[1] / gflop[2]:.3f}× (quotient {speedup * gflop[2] / gflop[1]:.2f})")
    if train:
        steps = {id(m): train_step(m, x8) for m in (deit, vim)}
        speeds = interleaved(runs(lambda model, x: steps[id(model)](), x8), batch, warmup=1, reps=reps)
        report(f"{size}: training step (fwd+bwd+AdamW), batch {batch}", labels, speeds, batch,
               [3 * t for t in roof(batch)])
    R.remove(vim)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--no-train", action="store_true", help="skip the training-step table")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gflops = gemm_gflops()
    print(f"{args.threads} threads, {backend_summary('cpu')}; GEMM {gflops:.0f} GFLOP/s (fp32, timed here)")
    for size in args.sizes:
        bench_size(size, gflops, args.batch, args.reps, not args.no_train)


if __name__ == "__main__":
    main()
