"""Accuracy and speed of (reduced) models: the engine behind ``eval.py``."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from tqdm import tqdm

import rmeeto.reduction as R
from rmeeto.flops import count
from rmeeto.models.vim import VisionMamba


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, num_classes: int, device: str = "cpu",
             desc: str = "eval") -> dict[str, float]:
    """Top-1/top-5 (%) of ``model`` over every batch of ``loader`` (images B×3×H×W, labels B)."""
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
def throughput(model: nn.Module, batch_size: int, img_size: int, device: str = "cpu",
               warmup: int = 2, reps: int = 5) -> float:
    """Images per second of the forward pass on a random B×3×H×W batch (median of ``reps``)."""
    model.eval().to(device)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    times = []
    for i in range(warmup + reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch_size / sorted(times)[len(times) // 2]


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


def training_free_table(model: VisionMamba, loader_factory, num_classes: int, methods: Sequence[str],
                        cuts: Sequence[float], device: str = "cpu", speed_batch: int = 8,
                        reps: int = 5, options: dict[str, dict] | None = None) -> list[Row]:
    """Evaluate ``model`` unreduced and with each method at each FLOPs cut (no training).

    ``loader_factory()`` returns a fresh evaluation loader. Speed is measured in this same run, so
    the speedup column compares like with like.
    """
    options = options or {}
    R.remove(model)
    base_gflops = count(model)
    configs = [("none", 0.0)] + [(m, c) for m in methods if m != "none" for c in cuts]
    rows: list[Row] = []
    for method, cut in tqdm(configs, desc="methods × cuts", unit="run"):
        R.remove(model)
        amount = 0.0
        if method != "none":
            try:
                amount = R.apply(model, method, flops_cut=cut, **options.get(method, {})).schedule.amounts[0]
            except ValueError as err:
                tqdm.write(f"skipping {method} at {cut:.0%}: {err}")
                continue
        acc = accuracy(model, loader_factory(), num_classes, device, desc=f"{method} {cut:.0%}")
        speed = throughput(model, speed_batch, model.cfg.img_size, device, reps=reps)
        rows.append(Row(method, cut if method != "none" else 0.0, float(amount), count(model),
                        acc["top1"], acc["top5"], speed))
    R.remove(model)
    base_speed = rows[0].images_per_s
    for row in rows:
        row.speedup = row.images_per_s / base_speed
        row.flops_cut = 1 - row.gflops / base_gflops
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
