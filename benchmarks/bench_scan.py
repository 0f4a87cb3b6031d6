"""Time the selective-scan backends side by side at the Vim-S size (CPU).

    .venv/bin/python benchmarks/bench_scan.py [--batch 8 --dim 768 --length 197 --state 16 --reps 7]

Forward runs under no_grad; fwd+bwd backpropagates into all eight inputs. Reps are interleaved
across backends (robust to load drift) and the median is reported. Peak extra memory is the peak of
one fwd+bwd is measured in a fresh process per backend (Linux): the peak resident set size (VmHWM,
what getrusage's ru_maxrss reports, reset through /proc/self/clear_refs) over one full-size
fwd+bwd minus the resident size just before it; inputs exist and a tiny warm-up has loaded kernels.
"""

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from rmeeto.ops import available_backends, backend_summary, selective_scan


def make_inputs(b: int, d: int, L: int, n: int) -> dict[str, torch.Tensor]:
    """Vim-like inputs: A = −exp(randn), delta pre-softplus ~ randn − 2."""
    g = torch.Generator().manual_seed(0)
    shapes = {"u": (b, d, L), "delta": (b, d, L), "A": (d, n), "B": (b, n, L), "C": (b, n, L)}
    x = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    x["delta"] -= 2
    x["A"] = -torch.exp(x["A"])
    x.update(D=torch.randn(d, generator=g), z=torch.randn(b, d, L, generator=g))
    x["delta_bias"] = 0.1 * torch.randn(d, generator=g)
    return {k: v.requires_grad_() for k, v in x.items()}


def forward(x: dict[str, torch.Tensor], backend: str) -> torch.Tensor:
    return selective_scan(**x, delta_softplus=True, backend=backend)


def fwd_only(x: dict[str, torch.Tensor], backend: str) -> None:
    with torch.no_grad():
        forward(x, backend)


def fwd_bwd(x: dict[str, torch.Tensor], backend: str) -> None:
    for v in x.values():
        v.grad = None
    forward(x, backend).sum().backward()


def timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def peak_extra_mib(args: argparse.Namespace, backend: str) -> float:
    """Peak extra resident memory of one fwd+bwd, measured in a fresh interpreter (module docstring)."""
    cmd = [sys.executable, __file__, "--memory-of", backend]
    for k in ("batch", "dim", "length", "state", "threads"):
        cmd += [f"--{k}", str(getattr(args, k))]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def _status_kib(field: str) -> int:
    line = next(li for li in Path("/proc/self/status").read_text().splitlines() if li.startswith(field + ":"))
    return int(line.split()[1])


def measure_memory(args: argparse.Namespace) -> None:
    fwd_bwd(make_inputs(1, 3, 4, 2), args.memory_of)
    x = make_inputs(args.batch, args.dim, args.length, args.state)
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to the current resident size
    before = _status_kib("VmRSS")
    fwd_bwd(x, args.memory_of)
    print((_status_kib("VmHWM") - before) / 1024)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--length", type=int, default=197)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        return measure_memory(args)
    print(backend_summary("cpu"))
    x = make_inputs(args.batch, args.dim, args.length, args.state)
    backends = [b for b in ("ref", "torch", "cpu") if b in available_backends()]
    modes = {"fwd": fwd_only, "fwd+bwd": fwd_bwd}
    times: dict[tuple[str, str], list[float]] = {(b, m): [] for b in backends for m in modes}
    for b in backends:  # warm-up (numba compile / cache load, allocator)
        for fn in modes.values():
            fn(x, b)
    for _ in range(args.reps):
        for b in backends:
            for m, fn in modes.items():
                times[b, m].append(timed(partial(fn, x, b)))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"selective_scan B={args.batch} D={args.dim} L={args.length} N={args.state}, "
        f"fp32, threads={args.threads}, median of {args.reps}"
    )
    print(f"{'backend':<8} {'fwd ms':>9} {'x ref':>7} {'fwd+bwd ms':>11} {'x ref':>7} {'peak MiB':>9}")
    for b in backends:
        f, fb = med[b, "fwd"], med[b, "fwd+bwd"]
        speed_f, speed_fb = med["ref", "fwd"] / f, med["ref", "fwd+bwd"] / fb
        mib = peak_extra_mib(args, b)
        print(f"{b:<8} {f:>9.1f} {speed_f:>6.1f}x {fb:>11.1f} {speed_fb:>6.1f}x {mib:>9.1f}")


if __name__ == "__main__":
    main()
