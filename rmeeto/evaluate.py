"""Accuracy and speed of (reduced) models: the engine behind ``eval.py`` and the demo."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from tqdm import tqdm

import rmeeto.reduction as R
from rmeeto.flops import count, count_config
from rmeeto.lit.metrics import EvalMetrics
from rmeeto.models.mamba import frozen
from rmeeto.models.vim import TokenReducer
from rmeeto.speed import MAX_SPREAD, measure, reducer_share, with_reducer

#: A measured speedup below this fraction of the FLOPs ratio gets a note saying where the time went.
SHORTFALL = 0.8

Normalisation = tuple[tuple[float, float, float], tuple[float, float, float]]


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


def model_normalisation(model: nn.Module) -> Normalisation | None:
    """(mean, std) the model's weights expect, from timm's ``model.pretrained_cfg`` convention, or None
    when the model does not say."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("mean") is None or cfg.get("std") is None:
        return None
    return tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"]))


def eval_datamodule(root: Path, model: nn.Module, split: str = "val", batch_size: int = 64, workers: int = 2,
                    normalisation: Normalisation | None = None) -> L.LightningDataModule:
    """A set-up DataModule reading ``root`` for ``model``'s input: clip shards for a video model, image
    shards (``{split}-index.json``) or an ImageFolder tree (``{split}/``) for an image model.
    ``normalisation`` (mean, std) overrides the data's own (the shard index's, else ImageNet's)."""
    root, shape = Path(root), input_shape(model)
    mean, std = normalisation or (None, None)
    shards = (root / f"{split}-index.json").is_file()
    if len(shape) == 4:
        if not shards:
            raise FileNotFoundError(f"{root}: a video model reads clip shards ({split}-index.json), none found")
        from rmeeto.data.video import VideoDataModule

        dm = VideoDataModule(str(root), val_split=split, num_frames=shape[1], img_size=shape[-1],
                             batch_size=batch_size, num_workers=workers, mean=mean, std=std)
    elif shards:
        from rmeeto.data.webdataset_dm import WebDatasetDataModule

        dm = WebDatasetDataModule(str(root), val_split=split, img_size=shape[-1], batch_size=batch_size,
                                  num_workers=workers, mean=mean, std=std)
    elif (root / split).is_dir():
        from rmeeto.data.folder_dm import ImageFolderDataModule

        dm = ImageFolderDataModule(str(root), val_dir=split, img_size=shape[-1], batch_size=batch_size,
                                   num_workers=workers, mean=mean, std=std)
    else:
        raise FileNotFoundError(f"{root}: neither shards ({split}-index.json) nor an ImageFolder ({split}/)")
    dm.setup("validate")
    if dm.num_classes > model.num_classes:
        raise ValueError(f"{root} has {dm.num_classes} classes, the model predicts {model.num_classes}")
    return dm


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
    """Top-1/top-5 (%) and mean loss of ``model`` over every batch of ``loader`` (inputs B×3×H×W or
    B×3×T×H×W, labels B), with the training pipeline's own metrics (:class:`rmeeto.lit.metrics.EvalMetrics`)."""
    model.eval().to(device)
    metrics = EvalMetrics(num_classes, "eval").to(device)
    with frozen(model):
        for images, labels in tqdm(loader, desc=desc, leave=False, unit="batch"):
            metrics.update(model(images.to(device)), labels.to(device))
    return {"top1": 100 * metrics.acc1.compute().item(), "top5": 100 * metrics.acc5.compute().item(),
            "loss": metrics.loss.compute().item(), "samples": int(metrics.samples.compute().item())}


def reduction_r(reducer: TokenReducer | None) -> float:
    """The r per reduction point of an :func:`rmeeto.reduction.apply` reducer (0 for None)."""
    return 0.0 if reducer is None else float(reducer.schedule.r[0])


@dataclass
class Config:
    """One configuration to evaluate: a label, the FLOPs cut it was solved for (0: none) and the reducer."""

    method: str
    target_cut: float
    reducer: TokenReducer | None


def plan_configs(model: nn.Module, methods: Sequence[str], cuts: Sequence[float],
                 options: dict[str, dict] | None = None,
                 report: Callable[[str], None] = print) -> list[Config]:
    """The unreduced model, then each method at each FLOPs cut with its r solved (no data needed).

    A (method, cut) pair no r reaches is skipped and ``report``\\ ed; a cut that no method reaches is
    a ValueError naming it and each method's reason.
    """
    options = options or {}
    configs = [Config("none", 0.0, None)]
    failures: dict[float, list[str]] = {}
    for method in [m for m in methods if m != "none"]:
        for cut in cuts:
            try:
                configs.append(Config(method, cut, R.apply(model, method, flops_cut=cut, **options.get(method, {}))))
            except ValueError as err:
                failures.setdefault(cut, []).append(f"{method}: {err}")
    R.remove(model)
    for cut, reasons in failures.items():
        if len(reasons) == len([m for m in methods if m != "none"]):
            others = ", ".join(reason.split(":")[0] for reason in reasons[1:])
            raise ValueError(f"--cuts {cut:g}: no method reaches it on this model ({reasons[0]}"
                             + (f"; likewise {others})" if others else ")"))
        for reason in reasons:
            report(f"skipping at {cut:.0%} FLOPs cut, {reason}")
    return configs


@dataclass
class Row:
    """One line of the evaluation table; speeds are medians of interleaved rounds (:mod:`rmeeto.speed`)."""

    method: str
    target_cut: float
    r: float
    gflops: float
    top1: float
    top5: float
    images_per_s: float = 0.0
    flops_cut: float = 0.0  # achieved: 1 − GFLOPs / unreduced GFLOPs
    speedup: float = 1.0  # images/s over the unreduced model's, paired round by round in the same run
    speedup_spread: float = 0.0  # interquartile range of the per-round speedups / their median
    flops_speedup: float = 1.0  # what the FLOPs promise: unreduced GFLOPs / GFLOPs
    speed_reps: int = 0
    speed_trusted: bool = True
    note: str = ""


def evaluate_configs(model: nn.Module, loader_factory: Callable[[], Iterable], num_classes: int,
                     configs: Sequence[Config], device: str = "cpu") -> list[Row]:
    """Accuracy and GFLOPs of ``model`` under each config (``configs[0]`` the unreduced reference);
    ``loader_factory()`` returns a fresh evaluation loader. Speed columns are left for :func:`add_speeds`."""
    R.remove(model)
    base_gflops = count(model)
    rows = []
    for config in tqdm(configs, desc="configurations", unit="run"):
        R.attach(model, config.reducer)
        acc = accuracy(model, loader_factory(), num_classes, device, desc=f"{config.method} {config.target_cut:.0%}")
        gflops = count(model)
        rows.append(Row(config.method, config.target_cut, reduction_r(config.reducer), gflops, acc["top1"],
                        acc["top5"], flops_cut=1 - gflops / base_gflops, flops_speedup=base_gflops / gflops))
    R.remove(model)
    return rows


def add_speeds(rows: Sequence[Row], model: nn.Module, reducers: Sequence[TokenReducer | None], batch_size: int,
               device: str = "cpu", reps: int = 7) -> None:
    """Time the unreduced model and each of ``reducers`` together on one random batch
    (:func:`rmeeto.speed.measure`) and fill the speed columns of the matching ``rows`` (None: the unreduced
    reference itself, 1× by definition), and their notes: untrusted figures, and speedups short of the FLOPs
    promise with the measured share of the forward spent in the reducer (FLOPs count none of its gathers
    and sorts)."""
    x = example_input(model.to(device), batch_size, device=device)
    reduced = [r for r in reducers if r is not None]
    reference, *speeds = measure(model, [None, *reduced], x, reps=reps)
    by_reducer = dict(zip(map(id, reduced), speeds, strict=True))
    for row, reducer in zip(rows, reducers, strict=True):
        speed = reference if reducer is None else by_reducer[id(reducer)]
        row.images_per_s, row.speedup, row.speedup_spread = speed.images_per_s, speed.speedup, speed.speedup_spread
        row.speed_reps, row.speed_trusted = speed.reps, speed.trusted
        notes = []
        if not speed.trusted:
            notes.append(f"speed untrusted: ±{speed.spread:.0%} img/s, ±{speed.speedup_spread:.0%} speedup over "
                         f"{speed.reps} rounds, medians known to ±{speed.uncertainty:.0%} (trusted: ≤ "
                         f"±{MAX_SPREAD:.0%}); rerun on a quiet machine or with more --speed_reps")
        if reducer is not None and speed.speedup < SHORTFALL * row.flops_speedup:
            share = with_reducer(model, reducer, lambda: reducer_share(model, x))
            notes.append(f"{speed.speedup:.2f}× of the {row.flops_speedup:.2f}× FLOPs promise: the reducer takes "
                         f"{share:.0%} of this forward at batch {batch_size}")
        row.note = "; ".join(notes)


def evaluate_as_loaded(model: nn.Module, loader: Iterable, num_classes: int, device: str = "cpu",
                       speed_batch: int = 32, reps: int = 7) -> Row:
    """One row for ``model`` with whatever reduction it carries (an export's); its speedup is measured
    against the same model unreduced."""
    reducer = model.token_reducer
    acc = accuracy(model, loader, num_classes, device)
    gflops, base_gflops = count(model), count_config(model.cfg)
    row = Row("as loaded" if reducer is None else type(reducer.method).__name__, 0.0, reduction_r(reducer),
              gflops, acc["top1"], acc["top5"], flops_cut=1 - gflops / base_gflops,
              flops_speedup=base_gflops / gflops)
    add_speeds([row], model, [reducer], speed_batch, device, reps)
    return row


def format_table(rows: Sequence[Row]) -> str:
    """Rows as an aligned text table (the method column as wide as the longest name), then one line per
    row note, keyed by the row's number."""
    width = max(len("method"), *(len(r.method) for r in rows))
    head = (f"{'#':>2} {'method':<{width}} {'cut':>5} {'r':>7} {'GFLOPs':>8} {'top-1':>6} {'top-5':>6} "
            f"{'img/s':>8} {'speedup':>13} {'FLOPs×':>6}")
    lines = [head, "-" * len(head)]
    for i, r in enumerate(rows):
        speedup = f"{r.speedup:.2f}×±{r.speedup_spread:.0%}{'' if r.speed_trusted else '*'}"
        lines.append(f"{i:>2} {r.method:<{width}} {r.flops_cut:>5.0%} {r.r:>7.4g} {r.gflops:>8.4f} "
                     f"{r.top1:>6.2f} {r.top5:>6.2f} {r.images_per_s:>8.1f} {speedup:>13} {r.flops_speedup:>5.2f}×")
    notes = [f"{i:>2}: {r.note}" for i, r in enumerate(rows) if r.note]
    if notes:
        lines += ["", "speedup: median of interleaved rounds ± interquartile range; * not trustworthy", *notes]
    return "\n".join(lines)


def rows_as_dicts(rows: Sequence[Row]) -> list[dict]:
    return [asdict(r) for r in rows]
