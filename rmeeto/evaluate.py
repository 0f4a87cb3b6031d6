"""Accuracy and speed of (reduced) models: the engine behind ``eval.py``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy
from tqdm import tqdm

import rmeeto.reduction as R
from rmeeto.flops import count
from rmeeto.models.vim import TokenReducer


def input_shape(model: nn.Module, img_size: int | None = None) -> tuple[int, ...]:
    """One input of ``model`` from its ``cfg``: 3×H×W for an image model, 3×T×H×W for a video model
    (``cfg.num_frames`` set); ``img_size`` overrides H = W."""
    cfg = model.cfg
    side = img_size or cfg.img_size
    frames = getattr(cfg, "num_frames", None)
    return (cfg.in_chans, side, side) if frames is None else (cfg.in_chans, frames, side, side)


def example_input(model: nn.Module, batch_size: int, img_size: int | None = None, device: str = "cpu") -> Tensor:
    """A random batch for ``model``: B×3×H×W images or B×3×T×H×W clips (see :func:`input_shape`)."""
    return torch.randn(batch_size, *input_shape(model, img_size), device=device)


def unsupported_methods(model: nn.Module, methods: Iterable[str]) -> dict[str, str]:
    """Method name → why ``model`` cannot run it with its default options (an unknown name, or a method
    that reads the SSM's Δ/B/C, MTR by default, on blocks without a recording mixer such as DeiT's)."""
    points = tuple(range(1, len(model.layers)))
    reasons = {}
    for name in methods:
        try:
            R.TokenReduction(model, R.make_method(name), R.Schedule(points, (0.0,) * len(points)))
        except ValueError as err:
            reasons[name] = str(err)
    return reasons


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, num_classes: int, device: str = "cpu",
             desc: str = "eval") -> dict[str, float]:
    """Top-1/top-5 (%) of ``model`` over every batch of ``loader`` (inputs B×3×H×W or B×3×T×H×W, labels B)."""
    model.eval().to(device)
    top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro").to(device)
    top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro").to(device)
    n = 0
    for images, labels in tqdm(loader, desc=desc, leave=False, unit="batch"):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        top1.update(logits, labels)
        top5.update(logits, labels)
        n += labels.numel()
    return {"top1": 100 * top1.compute().item(), "top5": 100 * top5.compute().item(), "samples": n}


@torch.no_grad()
def throughputs(model: nn.Module, reducers: Sequence[TokenReducer | None], batch_size: int,
                img_size: int | None = None, device: str = "cpu", warmup: int = 2, reps: int = 7) -> list[float]:
    """Images (clips) per second of ``model``'s forward with each of ``reducers`` attached (None: unreduced),
    on one random batch from :func:`example_input`; the model's own reducer is restored afterwards.

    Timed round-robin, one forward per reducer per round, and the median time taken per reducer, so
    drift and bursts of load on a shared machine hit every reducer alike and the ratios stay fair.
    """
    model.eval().to(device)
    x = example_input(model, batch_size, img_size, device)
    previous = model.token_reducer
    times: list[list[float]] = [[] for _ in reducers]
    try:
        for i in range(warmup + reps):
            for k, reducer in enumerate(reducers):
                R.attach(model, reducer)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(x)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                if i >= warmup:
                    times[k].append(time.perf_counter() - start)
    finally:
        R.attach(model, previous)
    return [batch_size / statistics.median(t) for t in times]


@dataclass
class Row:
    """One line of the evaluation table."""

    method: str
    target_cut: float
    amount: float
    gflops: float
    top1: float
    top5: float
    images_per_s: float
    flops_cut: float = 0.0  # achieved: 1 − GFLOPs / unreduced GFLOPs
    speedup: float = 1.0  # images/s over the unreduced model's, measured in the same run


def training_free_table(model: nn.Module, loader_factory, num_classes: int, methods: Sequence[str],
                        cuts: Sequence[float], device: str = "cpu", speed_batch: int = 8,
                        reps: int = 7, options: dict[str, dict] | None = None) -> list[Row]:
    """Evaluate ``model`` unreduced and with each method at each FLOPs cut (no training).

    ``loader_factory()`` returns a fresh evaluation loader. Speeds are timed together at the end
    (:func:`throughputs`), so the speedup column compares like with like.
    """
    options = options or {}
    R.remove(model)
    base_gflops = count(model)
    configs = [("none", 0.0)] + [(m, c) for m in methods if m != "none" for c in cuts]
    rows: list[Row] = []
    reducers: list[TokenReducer | None] = []
    for method, cut in tqdm(configs, desc="methods × cuts", unit="run"):
        reducer = None
        if method != "none":
            try:
                reducer = R.apply(model, method, flops_cut=cut, **options.get(method, {}))
            except ValueError as err:
                tqdm.write(f"skipping {method} at {cut:.0%}: {err}")
                continue
        R.attach(model, reducer)
        acc = accuracy(model, loader_factory(), num_classes, device, desc=f"{method} {cut:.0%}")
        gflops = count(model)
        amount = 0.0 if reducer is None else float(reducer.schedule.r[0])
        rows.append(Row(method, cut if reducer else 0.0, amount, gflops, acc["top1"], acc["top5"], 0.0,
                        flops_cut=1 - gflops / base_gflops))
        reducers.append(reducer)
    speeds = throughputs(model, reducers, speed_batch, device=device, reps=reps)
    R.remove(model)
    for row, speed in zip(rows, speeds, strict=True):
        row.images_per_s, row.speedup = speed, speed / speeds[0]
    return rows


def format_table(rows: Sequence[Row]) -> str:
    """Rows as an aligned text table."""
    head = f"{'method':<10} {'cut':>5} {'r':>7} {'GFLOPs':>8} {'top-1':>6} {'top-5':>6} {'img/s':>8} {'speedup':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.method:<10} {r.flops_cut:>5.0%} {r.amount:>7.4g} {r.gflops:>8.4f} {r.top1:>6.2f} "
                     f"{r.top5:>6.2f} {r.images_per_s:>8.1f} {r.speedup:>6.2f}×")
    return "\n".join(lines)


def rows_as_dicts(rows: Sequence[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
