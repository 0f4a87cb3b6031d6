"""``eval.py``: evaluate Vision Mamba (Vim, VideoMamba) and DeiT models with token reduction.

    python eval.py                                   # the bundled demo: training-free table
    python eval.py --training_free --model vim_small \\
        --checkpoint vim_s_midclstok_80p5acc.pth --data /imagenet-shards
    python eval.py --training_free --model videomamba_tiny_k400_f8 \\
        --checkpoint videomamba_t16_k400_f8_res224.pth --data /k400-clip-shards   # video: clip shards
    python eval.py --training_free --model deit_small_patch16_224 \\
        --checkpoint deit_small_patch16_224-cd65a155.pth --data /imagenet-shards  # timm/DeiT state dict
    python eval.py --export outputs/demo/run/export  # a re-trained, exported model as it is
    python eval.py --visualize cat.jpg --methods [rmeeto,mtr]
    python eval.py --config eval.yaml                # the same settings from a YAML file

Settings are parsed by jsonargparse (as ``train.py``'s): lists as ``--cuts [0.2,0.3]``, architecture
overrides as ``--model_args '{depth: 12}'`` or ``--model_args.depth 12``. A known error (bad checkpoint,
shard, path, model name or r) prints one line and exits 1; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import csv
import json
import sys
from argparse import RawDescriptionHelpFormatter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import timm
import torch
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, DefaultHelpFormatter
from torch import nn

import rmeeto
from rmeeto.data.shards import ShardError
from rmeeto.demo_recipe import CHECKPOINT as DEMO_CHECKPOINT
from rmeeto.demo_recipe import DATA as DEMO_DATA
from rmeeto.evaluate import (
    Normalisation,
    Row,
    add_speeds,
    eval_datamodule,
    evaluate_as_loaded,
    evaluate_configs,
    format_table,
    model_normalisation,
    plan_configs,
    rows_as_dicts,
    unsupported_methods,
)
from rmeeto.lit.callbacks import check_writable
from rmeeto.ops import backend_summary
from rmeeto.speed import default_speed_batch

DEFAULT_METHODS = ["rmeeto", "prune", "mtr", "evit", "tome", "random"]
#: Errors with a message that names the file, key or value at fault: printed as one line without --debug.
KNOWN_ERRORS = (ValueError, OSError, ShardError, KeyError)


@dataclass
class EvalSettings:
    """What to evaluate and how.

    Args:
        model: vim_{tiny,small,base,demo}, videomamba_{tiny,small,middle,base},
            videomamba_{tiny,small,middle}_k400_f{8,16,32,64}, videomamba_demo, or a timm ViT/DeiT name
        model_args: architecture overrides: config fields (Vim, VideoMamba) or timm kwargs (DeiT)
        checkpoint: weights passed to ``rmeeto.create_model(pretrained=...)`` as given (a file, or
            hf-hub:<repo>[/<file>]); for DeiT a timm/DeiT state dict; default: the bundled demo's
        export: an export directory or hf-hub:<user>/<repo> (rmeeto.export.save); overrides --model
        data: webdataset shards dir (with <split>-index.json) or ImageFolder root; clip shards for a video
            model; default: the demo shards (written on first use) for the demo model
        split: the evaluation split
        training_free: table of methods × FLOPs cuts; default: on for the bundled demo, off otherwise
            (the model as loaded, with any reduction an export carries)
        methods: default: rmeeto prune mtr evit tome random, less those the model cannot run
        cuts: FLOPs cuts of the training-free table, each in (0, 1)
        batch_size: evaluation batch size
        workers: data loader workers
        speed_batch: batch of the speed runs; default 128 on a GPU, 32 on a CPU (compute-bound there)
        speed_reps: fewest timed rounds per configuration (more are run while the spread is large)
        device: cuda when available, else cpu
        mean: normalisation mean; default: the model's pretrained_cfg, else the data's own
        std: normalisation std; default: the model's pretrained_cfg, else the data's own
        visualize: an image: draw which patches each method merges, at the first cut; nothing else runs
        out: results directory (checked writable before anything runs)
    """

    model: str = "vim_demo"
    model_args: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    export: str | None = None
    data: str | None = None
    split: str = "val"
    training_free: bool | None = None
    methods: list[str] | None = None
    cuts: list[float] = field(default_factory=lambda: [0.2, 0.3, 0.4])
    batch_size: int = 64
    workers: int = 2
    speed_batch: int | None = None
    speed_reps: int = 7
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    visualize: str | None = None
    out: str = "outputs/eval"


FLAGS = ("training_free",)  # booleans given as bare flags (--training_free / --no_training_free)


class HelpFormatter(DefaultHelpFormatter, RawDescriptionHelpFormatter):
    """jsonargparse's help with the description (this module's examples) kept as written."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="eval.py", description=__doc__, exit_on_error=False, formatter_class=HelpFormatter)
    parser.add_argument("--config", action=ActionConfigFile, help="settings from a YAML file")
    parser.add_class_arguments(EvalSettings, as_group=False, skip=set(FLAGS))
    parser.add_argument("--training_free", action=ActionYesNo, default=None,
                        help="table of methods × FLOPs cuts (default: on for the bundled demo only)")
    parser.add_argument("--debug", action=ActionYesNo, default=False, help="show tracebacks of known errors")
    return parser


def parse(argv: Sequence[str] | None = None) -> tuple[EvalSettings, bool]:
    """(settings, debug) from the command line; a bad flag or value raises jsonargparse's ArgumentError."""
    ns = build_parser().parse_args(argv)
    return EvalSettings(**{f.name: ns[f.name] for f in fields(EvalSettings)}), bool(ns.debug)


def is_demo(s: EvalSettings) -> bool:
    return s.export is None and s.checkpoint is None and s.model == "vim_demo"


def check_settings(s: EvalSettings) -> None:
    """Errors that need no model or data: FLOPs cuts outside (0, 1), sizes below 1, a missing image, an
    unusable device, the demo weights with architecture overrides."""
    bad = [c for c in s.cuts if not 0 < c < 1]
    if bad:
        raise ValueError(f"--cuts {' '.join(map(str, bad))}: a FLOPs cut is a fraction in (0, 1)")
    for name in ("batch_size", "speed_batch", "speed_reps"):
        value = getattr(s, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} {value}: must be at least 1")
    if s.visualize is not None and not Path(s.visualize).is_file():
        raise FileNotFoundError(f"--visualize {s.visualize}: no such image file")
    try:
        device = torch.device(s.device)
    except RuntimeError as err:
        raise ValueError(f"--device {s.device!r}: not a device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {s.device}: CUDA is not available here")
    if is_demo(s) and s.model_args:
        raise ValueError("--model_args need --checkpoint: the bundled demo weights fit the demo architecture only")


def load_model(s: EvalSettings) -> nn.Module:
    """The export, or ``model`` with ``model_args`` and ``checkpoint`` (passed on unchanged): an rmeeto name
    (Vim, VideoMamba) through ``rmeeto.create_model``, a timm ViT/DeiT name through ``create_deit``."""
    from rmeeto.export import load
    from rmeeto.models.deit import create_deit
    from rmeeto.models.registry import VARIANTS, resolve_name

    if s.export is not None or is_demo(s):
        return load(s.export or DEMO_CHECKPOINT)
    if s.checkpoint is None:
        raise ValueError(f"--checkpoint is required for {s.model} (the public weights are not bundled)")
    try:
        resolve_name(s.model)
    except ValueError:
        if s.model not in timm.list_models():
            raise ValueError(f"unknown model {s.model!r}: neither an rmeeto model ({', '.join(sorted(VARIANTS))}) "
                             "nor a timm ViT/DeiT name") from None
        return create_deit(s.model, pretrained=s.checkpoint, **s.model_args)
    return rmeeto.create_model(s.model, pretrained=s.checkpoint, **s.model_args)


def normalisation(s: EvalSettings, model: nn.Module) -> Normalisation | None:
    """--mean/--std when given (both or neither), else the model's pretrained_cfg; None: the data's own."""
    if (s.mean is None) != (s.std is None):
        raise ValueError("--mean and --std go together: give both or neither")
    return (s.mean, s.std) if s.mean is not None else model_normalisation(model)


def resolve_methods(model: nn.Module, requested: list[str] | None) -> list[str]:
    """``requested`` if the model can run all of them (else a ValueError naming why), or the default methods
    less those it cannot run, printing each skipped one and why."""
    unsupported = unsupported_methods(model, requested or DEFAULT_METHODS)
    if requested is not None:
        if unsupported:
            raise ValueError("; ".join(f"--methods {name}: {why}" for name, why in unsupported.items()))
        return requested
    for name, why in unsupported.items():
        print(f"skipping {name} for {type(model).__name__}: {why}")
    return [name for name in DEFAULT_METHODS if name not in unsupported]


def write_results(rows: list[Row], out: Path, title: str) -> None:
    """results.csv, results.json and accuracy_vs_gflops.png under ``out``."""
    from rmeeto.viz import plot_accuracy_vs_flops

    dicts = rows_as_dicts(rows)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dicts[0]))
        writer.writeheader()
        writer.writerows(dicts)
    (out / "results.json").write_text(json.dumps(dicts, indent=2))
    plot_accuracy_vs_flops(dicts, out / "accuracy_vs_gflops.png", title=title)


def visualize(s: EvalSettings, model: nn.Module, methods: list[str], out: Path) -> list[Path]:
    """One PNG per method: which patches of the image merge at each reduction point, at the first cut."""
    from PIL import Image

    from rmeeto.data.transforms import eval_transform
    from rmeeto.viz import draw_merge_maps, merge_maps

    mean, std = normalisation(s, model) or (None, None)
    image = eval_transform(model.cfg.img_size, mean, std)(Image.open(s.visualize).convert("RGB"))
    cut, paths = s.cuts[0], []
    for method in methods:
        try:
            maps = merge_maps(model, image.to(s.device), method, flops_cut=cut)
        except ValueError as err:
            raise ValueError(f"--visualize with {method} at a {cut:.0%} FLOPs cut: {err}") from None
        path = out / f"merge_{method}_{round(100 * cut)}_{Path(s.visualize).stem}.png"
        draw_merge_maps(image, maps, path, title=f"{method} at −{cut:.0%} FLOPs")
        paths.append(path)
    return paths


@torch.no_grad()
def run(s: EvalSettings) -> list[Row]:
    """Evaluate as ``s`` says and write the results; returns the table's rows (none for --visualize)."""
    check_settings(s)
    out = Path(s.out)
    check_writable(out, "--out")  # before any work: a read-only --out fails now, not after the evaluation
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(s).to(s.device)
    methods = resolve_methods(model, s.methods)
    if s.visualize:
        for path in visualize(s, model, methods, out):
            print(f"wrote {path}")
        return []
    training_free = is_demo(s) if s.training_free is None else s.training_free
    configs = plan_configs(model, methods, s.cuts) if training_free else None
    data = s.data
    if data is None:
        if not is_demo(s):
            raise ValueError("--data is required for a model other than the bundled demo")
        from rmeeto.data.demo import ensure_demo_shards

        data = ensure_demo_shards(DEMO_DATA)
    dm = eval_datamodule(Path(data), model, s.split, s.batch_size, s.workers, normalisation(s, model))
    speed_batch = s.speed_batch or default_speed_batch(s.device)
    print(backend_summary(s.device))
    if training_free:
        rows = evaluate_configs(model, dm.val_dataloader, dm.num_classes, configs, s.device)
        add_speeds(rows, model, [c.reducer for c in configs], speed_batch, s.device, s.speed_reps)
        title = f"{s.export or s.model}: training-free token reduction"
    else:  # the model as loaded (an export keeps its reduction)
        rows = [evaluate_as_loaded(model, dm.val_dataloader(), dm.num_classes, s.device, speed_batch, s.speed_reps)]
        title = f"{s.export or s.checkpoint}"
    print(format_table(rows))
    paper = (getattr(model, "pretrained_cfg", None) or {}).get("paper_top1")
    if paper is not None:
        print(f"measured top-1 {rows[0].top1:.2f} (paper: {paper})")
    write_results(rows, out, title)
    print(f"results in {out}/ (results.csv, results.json, accuracy_vs_gflops.png)")
    return rows


def one_line(err: BaseException) -> str:
    """The first line of ``err``'s message, a wrapped library error's text replaced by its type name (torch's
    long advice on ``weights_only`` included)."""
    text, cause = str(err), err.__cause__
    if cause is not None and str(cause) and str(cause) in text and str(cause) != text:
        text = text.replace(str(cause), type(cause).__name__)
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 on success, 1 for a known error (one line on stderr), 2 for a bad flag."""
    from jsonargparse import ArgumentError

    try:
        settings, debug = parse(argv)
    except ArgumentError as err:
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"eval.py: error: {reason} (eval.py --help lists the settings)", file=sys.stderr)
        return 2
    try:
        run(settings)
    except KNOWN_ERRORS as err:
        if debug:
            raise
        print(f"eval.py: error: {one_line(err)} (--debug shows the traceback)", file=sys.stderr)
        return 1
    return 0
