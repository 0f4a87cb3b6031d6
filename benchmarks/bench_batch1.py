#!/usr/bin/env python
"""Why R-MeeTo's speedup at batch 1 stays under its FLOPs ratio on this CPU: what each block costs whatever its tokens.

Inside rmeeto.frozen a Vim runs all its blocks, and R-MeeTo's merges between them, in one kernel call
(rmeeto.models.frozen_forward): no Python runs between them. Timed here in one interleaved run at batch 1, fp32,
random weights (:func:`rmeeto.speed.interleaved`):

- the unreduced Vim's blocks on the first L of its embedded tokens, for several L: a least-squares line through the
  times gives a block's cost as f + v·L, f being what does not shrink with the tokens (the products' weights read
  from the caches at every forward, each kernel's and product's own cost per call);
- the Vim and the Vim with R-MeeTo at the paper's r, whole forwards and their blocks alone (from the embedded tokens).

Printed: R-MeeTo's speedup over its FLOPs ratio (the quotient) for the whole forwards and for the blocks alone, and
what the line predicts for the merged model's token counts, with f as measured and with f = 0. Nothing is asserted.

    .venv/bin/python benchmarks/bench_batch1.py [--size small] [--threads 2] [--reps 9]
"""

from __future__ import annotations

import argparse

import torch
from bench_cpu import SIZES

import rmeeto
import rmeeto.reduction as R
from rmeeto.flops import count
from rmeeto.models import frozen_forward
from rmeeto.models.vim import TokenState
from rmeeto.ops import backend_summary, use_backend
from rmeeto.speed import interleaved

TOKENS = (20, 50, 76, 120, 160, 197)
"""Token counts the unreduced blocks are timed at (R-MeeTo r=11 takes Vim-S's 197 down to 76)."""


def line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name, r, _ = SIZES[args.size]
    vim = rmeeto.create_model(name).eval()
    reducer = R.apply(vim, "rmeeto", r=r)
    merged_flops = count(vim)
    R.attach(vim, None)
    ratio = count(vim) / merged_flops
    short = name.split("_patch")[0]
    print(f"{args.threads} threads, {backend_summary('cpu')}; {short} and {short} R-MeeTo r={r}, "
          f"FLOPs ratio {ratio:.3f}")

    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), use_backend("cpu"), rmeeto.frozen(vim):
        embedded = vim.embed(x)
        depth, n = len(vim.layers), embedded.hidden.shape[1]

        def with_reducer(red, fn):
            def run():
                R.attach(vim, red)
                return fn()
            return run

        def blocks(hidden: torch.Tensor, cls: torch.Tensor):
            return lambda: vim.forward_blocks(TokenState(hidden, None, cls))

        runs = [
            with_reducer(None, lambda: vim(x)), with_reducer(reducer, lambda: vim(x)),
            with_reducer(None, blocks(embedded.hidden, embedded.cls_index)),
            with_reducer(reducer, blocks(embedded.hidden, embedded.cls_index)),
        ]  # fmt: skip
        tokens = [t for t in TOKENS if t <= n]
        runs += [with_reducer(None, blocks(embedded.hidden[:, :t].contiguous(), embedded.cls_index.clamp(max=t - 1)))
                 for t in tokens]  # fmt: skip
        # every run's row counts keep their stack of packed weights: with the default (the last two) each timing's
        # first call would pack all blocks' weights anew, tens of ms, after the other runs had
        frozen_forward.STACKS = len(runs)
        speeds = interleaved(runs, 1, reps=args.reps)
    ms = [1e3 / s.images_per_s for s in speeds]
    per_block = [t / depth for t in ms[4:]]
    f, v = line([float(t) for t in tokens], per_block)
    print(f"\nthe unreduced blocks at batch 1 ({depth} blocks, ms a block; ±IQR of the calls):")
    for t, b, s in zip(tokens, per_block, speeds[4:], strict=True):
        print(f"  L = {t:3d}: {b:6.3f} ms  ±{s.spread:.0%}   line {f + v * t:6.3f}")
    print(f"line: {1e3 * f:.0f} µs a block + {1e3 * v:.2f} µs a token")

    counts = [tokens for tokens, _ in reducer.schedule.token_counts(reducer.method, n, depth)]
    predicted = sum(f + v * c for c in counts)
    print(f"\n{'':<26} {'forward ms':>11} {'blocks ms':>10}")
    for label, whole, alone in ((short, ms[0], ms[2]), (f"{short} R-MeeTo r={r}", ms[1], ms[3])):
        print(f"{label:<26} {whole:>11.2f} {alone:>10.2f}")
    print(f"\nR-MeeTo's quotient (speedup / FLOPs ratio {ratio:.3f}):")
    print(f"  whole forwards            {ms[0] / ms[1] / ratio:.3f}")
    print(f"  blocks alone              {ms[2] / ms[3] / ratio:.3f}")
    print(f"  the line, f as measured   {depth * (f + v * n) / predicted / ratio:.3f}"
          f"   (f is {depth * f / predicted:.0%} of the merged blocks' time)")
    print(f"  the line, f = 0           {depth * n / sum(counts) / ratio:.3f}")


if __name__ == "__main__":
    main()
