#!/usr/bin/env python
"""What a GPU user runs first (a few minutes on one H100): is the `cuda` path right, and how fast is it?

1. Parity: `cuda` vs `ref` logits and gradients on Vim-S, unreduced, R-MeeTo r=11 and MTR (fp32).
2. Inference img/s, fp16 and bf16 autocast, batch 128: unreduced, R-MeeTo r=11, MTR at −30 % FLOPs.
   Anchor: the authors' H100 Vim-S, 1954 → 2158 img/s (1.10×).
3. Training-step img/s (bf16 autocast, AdamW) of the paper recipe (R-MeeTo, cross-entropy) and the
   official one (plus distillation from the frozen unreduced model), with peak memory. Anchor: 3 epochs
   of Vim-S on 1×8 H100 in 25.2 min, about 320 img/s per GPU (the full Lightning loop, data included;
   here the model step alone).
4. The same on the `torch` backend, eager and torch.compile'd, for users without mamba-ssm.

Nothing is asserted except parity. ``--kernels-only`` leaves out 4 (docs/cuda.md has its H200 figures).
``--tiny`` runs a small model on CPU (the CI check that this script works); its numbers say nothing about
GPUs. Usage:
    .venv/bin/python benchmarks/gpu.py [--tiny] [--kernels-only] [--batch 128] [--reps 10]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

import rmeeto
import rmeeto.reduction as R
from rmeeto.ops import available_backends, backend_summary, use_backend

TINY = dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_classes=10)


def build(tiny: bool, method: str | None, device: str) -> torch.nn.Module:
    """Vim-S (or the tiny model) with ``method``'s reducer: rmeeto r=11 or MTR at −30 % FLOPs
    (tiny: r=2 and r=0.1; its few blocks cannot reach −30 %)."""
    torch.manual_seed(0)
    model = rmeeto.create_model("vim_demo", **TINY) if tiny else rmeeto.create_model("vim_small")
    if method == "rmeeto":
        R.apply(model, "rmeeto", r=2 if tiny else 11)
    elif method == "mtr":
        R.apply(model, "mtr", r=0.1) if tiny else R.apply(model, "mtr", flops_cut=0.3)
    return model.to(device)


def timed(step: Callable[[], object], device: str, reps: int, warmup: int = 2) -> float:
    """Median seconds per call of ``step`` (synchronised on CUDA); the peak memory counted from here."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_mib(device: str) -> str:
    """The peak memory allocated since the last ``timed`` began."""
    return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device == "cuda" else "n/a"


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want|."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(torch.finfo(want.dtype).tiny)).item()


def logits_and_grads(model: torch.nn.Module, backend: str, x: torch.Tensor, y: torch.Tensor):
    """Logits and parameter gradients of a cross-entropy loss, on ``backend``."""
    model.zero_grad(set_to_none=True)
    with use_backend(backend):
        logits = model(x)
    F.cross_entropy(logits, y).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def parity(tiny: bool, device: str, backend: str) -> None:
    """Max relative difference of ``backend``'s logits and parameter gradients to ``ref``'s (fp32, eval mode,
    cuDNN's TF32 off so that the ``ref`` path's convolutions compute in fp32 as the kernels do)."""
    size = TINY["img_size"] if tiny else 224
    x = torch.randn(2, 3, size, size, device=device)
    y = torch.randint(0, TINY["num_classes"] if tiny else 1000, (2,), device=device)
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    for method in (None, "rmeeto", "mtr"):
        model = build(tiny, method, device).eval()
        want, want_grads = logits_and_grads(model, "ref", x, y)
        got, got_grads = logits_and_grads(model, backend, x, y)
        logits_rel = relative(got, want)
        grads_rel, name = max((relative(got_grads[n], g), n) for n, g in want_grads.items())
        same = logits_rel < 1e-4 and grads_rel < 1e-3 and got_grads.keys() == want_grads.keys()
        verdict = "ok" if same else "MISMATCH"
        print(f"parity {backend} vs ref, {method or 'unreduced'}: max rel diff logits {logits_rel:.2e}, "
              f"gradients {grads_rel:.2e} ({name}) ({verdict})")  # fmt: skip
    torch.backends.cudnn.allow_tf32 = tf32


def inference(tiny: bool, device: str, backend: str, batch: int, reps: int, compiled: bool = False) -> None:
    x = torch.randn(batch, 3, *(2 * [TINY["img_size"] if tiny else 224]), device=device)
    dtypes = (torch.float16, torch.bfloat16) if device == "cuda" else (torch.bfloat16,)
    for dtype in dtypes:
        base = None
        for method in (None, "rmeeto", "mtr"):
            model = build(tiny, method, device).eval()
            # tiny (CPU check): dynamo only, inductor's C++ build would dominate the CI time
            fn = torch.compile(model, backend="eager" if tiny else "inductor") if compiled else model
            with use_backend(backend), torch.no_grad(), torch.autocast(device, dtype):
                ips = batch / timed(partial(fn, x), device, reps)
            base = base or ips
            name = f"{backend}{' compiled' if compiled else ''}"
            print(f"infer {name:14s} {str(dtype)[6:]:8s} {method or 'unreduced':9s} {ips:9.1f} img/s "
                  f"({ips / base:.2f}x)  peak {peak_mib(device)}")  # fmt: skip


def train_step(student, teacher, opt, x, y, distill: bool, backend: str, device: str) -> None:
    """One AdamW step, bf16 autocast: cross-entropy, or half CE and half KL to the teacher's output."""
    with use_backend(backend), torch.autocast(device, torch.bfloat16):
        logits = student(x)
        loss = F.cross_entropy(logits.float(), y)
        if distill:
            with torch.no_grad():
                target = teacher(x).float().log_softmax(-1)
            kl = F.kl_div(logits.float().log_softmax(-1), target, log_target=True, reduction="batchmean")
            loss = 0.5 * loss + 0.5 * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def training(tiny: bool, device: str, backend: str, batch: int, reps: int) -> None:
    """Training steps of the R-MeeTo model: the paper recipe (cross-entropy) and the official one
    (plus distillation from the frozen unreduced model, weight 0.5)."""
    x = torch.randn(batch, 3, *(2 * [TINY["img_size"] if tiny else 224]), device=device)
    y = torch.randint(0, TINY["num_classes"] if tiny else 1000, (batch,), device=device)
    for recipe, distill in (("paper", False), ("official", True)):
        student = build(tiny, "rmeeto", device).train()
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
        R.attach(teacher, None)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
        step = partial(train_step, student, teacher, opt, x, y, distill, backend, device)
        ips = batch / timed(step, device, reps)
        print(f"train {backend:8s} {recipe:8s} distill={'on' if distill else 'off':3s} {ips:9.1f} img/s  "
              f"peak {peak_mib(device)}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small model on CPU (CI check of this script)")
    parser.add_argument("--batch", type=int, default=None, help="inference batch (default 128; tiny: 2)")
    parser.add_argument("--train-batch", type=int, default=None, help="training batch (default 128; tiny: 2)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 10; tiny: 1)")
    parser.add_argument("--kernels-only", action="store_true", help="time the cuda backend alone (not torch)")
    args = parser.parse_args()
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.tiny:
        parser.error("no CUDA device: this benchmark is for GPUs (use --tiny for the CPU check)")
    batch = args.batch or (2 if args.tiny else 128)
    train_batch = args.train_batch or (2 if args.tiny else 128)
    reps = args.reps or (1 if args.tiny else 10)
    print(backend_summary(device))
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    fast = "cuda" if "cuda" in available_backends() else None
    if not fast:
        if args.kernels_only:
            parser.error("--kernels-only, but the cuda backend is unavailable (see the line above)")
        print("cuda backend unavailable: kernel timings skipped (see docs/cuda.md)")
    parity(args.tiny, device, fast or "torch")
    for backend in ([fast] if fast else []) + ([] if args.kernels_only else ["torch"]):
        inference(args.tiny, device, backend, batch, reps)
        training(args.tiny, device, backend, train_batch, reps)
    if not args.kernels_only:
        inference(args.tiny, device, "torch", batch, reps, compiled=True)


if __name__ == "__main__":
    main()
