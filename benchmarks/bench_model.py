#!/usr/bin/env python
"""Vim on this machine: reduced vs unreduced speed, merge overhead, scan share, training-step memory.

Everything is measured side by side in one run; nothing here is asserted. Usage:
    .venv/bin/python benchmarks/bench_model.py [--model vim_small] [--batch 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import threading
import time

import torch

import rmeeto
import rmeeto.models.mamba as mamba
import rmeeto.reduction as R
from rmeeto.evaluate import example_input
from rmeeto.flops import count
from rmeeto.ops import backend_summary, scan_cpu
from rmeeto.speed import MAX_SPREAD, MIN_REPS, measure, reducer_share

UNTRUSTED = f"; NOT trustworthy: under {MIN_REPS} rounds or the median known to worse than ±{MAX_SPREAD:.0%}"


def op_shares(model, x, reps: int = 3) -> dict[str, float]:
    """Share of forward CPU time in the selective scan, the causal conv and the matrix products (every
    aten::mm, addmm and bmm: the linear layers, and the products the mixer runs itself), over reps profiled
    forwards (one forward alone swings by several points on a shared machine). The scan and the conv are
    timed at the ops' entry points, or at their kernels where a mixer calls those directly
    (mamba_inner_cpu, at inference on the cpu backend)."""
    inside = threading.local()

    def labelled(fn, label):
        def run(*a, **k):
            if getattr(inside, "label", None):  # a kernel under an entry point already timed
                return fn(*a, **k)
            inside.label = label
            try:
                with torch.profiler.record_function(label):
                    return fn(*a, **k)
            finally:
                inside.label = None
        return run

    patched = [(mamba, "selective_scan", "selective_scan"), (mamba, "causal_conv1d", "causal_conv1d")]
    if scan_cpu.AVAILABLE:
        patched += [(scan_cpu._k, "scan_forward", "selective_scan"), (scan_cpu._k, "conv_forward", "causal_conv1d")]
    originals = [getattr(owner, name) for owner, name, _ in patched]
    for owner, name, label in patched:
        setattr(owner, name, labelled(getattr(owner, name), label))
    try:
        model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(reps):
                model(x)
            wall = time.perf_counter() - start
    finally:
        for (owner, name, _), fn in zip(patched, originals, strict=True):
            setattr(owner, name, fn)
    totals = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages()}
    return {"selective_scan": totals.get("selective_scan", 0) / wall,
            "causal_conv1d": totals.get("causal_conv1d", 0) / wall,
            "matrix products": sum(totals.get(f"aten::{op}", 0) for op in ("mm", "addmm", "bmm")) / wall}


def _train_step_peak(name: str, batch: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    model = rmeeto.create_model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    queue.put(((after - before) / 1024, after / 1024))


def train_step_memory(name: str, batch: int, threads: int) -> tuple[float, float]:
    """(MiB the first training step adds to the peak RSS, peak RSS MiB), in a fresh process."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_train_step_peak, args=(name, batch, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="vim_small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--r", type=int, default=11, help="R-MeeTo r (11 = the paper's Vim-S setting)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    model = rmeeto.create_model(args.model).eval()
    x = example_input(model, args.batch)
    print(f"{args.model}, batch {args.batch}, {args.threads} threads, {backend_summary('cpu')}")

    base_g = count(model)
    reducer = R.apply(model, "rmeeto", r=args.r)
    red_g = count(model)
    base, reduced = measure(model, [None, reducer], x, reps=args.reps)  # interleaved rounds
    share = reducer_share(model, x, args.reps)
    R.remove(model)

    print(f"\n{'model':<16} {'GFLOPs':>8} {'ms/batch':>9} {'img/s':>8} {'±IQR':>6}")
    for label, g, speed in (("unreduced", base_g, base), (f"R-MeeTo r={args.r}", red_g, reduced)):
        print(f"{label:<16} {g:>8.3f} {1e3 * args.batch / speed.images_per_s:>9.1f} {speed.images_per_s:>8.1f} "
              f"{speed.spread:>6.0%}")
    ideal = base_g / red_g
    print(f"\nmeasured speedup {reduced.speedup:.3f}× ±{reduced.speedup_spread:.0%} (median and IQR of "
          f"{reduced.reps} paired rounds{'' if reduced.trusted else UNTRUSTED}), "
          f"FLOPs ratio {ideal:.3f}×, quotient {reduced.speedup / ideal:.3f} "
          "(authors on H100, Vim-S: 1.10/1.42 = 0.77)")
    print(f"time inside the token reducer: {100 * share:.2f}% of the reduced forward (blocks and merges called one "
          "at a time, so that it can be timed)")

    shares = op_shares(model, x)
    print("\nshare of the unreduced forward (torch.profiler, CPU time / wall):")
    for name, s in shares.items():
        print(f"  {name:<16} {100 * s:5.1f}%")

    torch.set_grad_enabled(True)
    added, peak = train_step_memory(args.model, args.batch, args.threads)
    cfg = model.cfg
    state_mib = args.batch * 2 * cfg.embed_dim * (cfg.num_patches + 1) * cfg.d_state * 4 / 2**20
    print(f"\ntraining step (fwd+bwd+AdamW), batch {args.batch}: peak RSS {peak:.0f} MiB, "
          f"{added:.0f} MiB above the model's footprint (ru_maxrss in a fresh process); "
          f"one B×D×L×N fp32 scan tensor is {state_mib:.0f} MiB")


if __name__ == "__main__":
    main()
