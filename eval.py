#!/usr/bin/env python
"""Evaluate Vision Mamba (Vim, VideoMamba) and DeiT models with token reduction.

    python eval.py                                   # the bundled demo: training-free table
    python eval.py --training-free --model vim_small \\
        --checkpoint vim_s_midclstok_80p5acc.pth --data /imagenet-shards
    python eval.py --training-free --model videomamba_tiny_k400_f8 \\
        --checkpoint videomamba_t16_k400_f8_res224.pth --data /k400-clip-shards   # video: clip shards
    python eval.py --training-free --model deit_small_patch16_224 \\
        --checkpoint deit_small_patch16_224-cd65a155.pth --data /imagenet-shards  # timm/DeiT state dict
    python eval.py --export outputs/demo/export      # a re-trained, exported model as it is
    python eval.py --visualize cat.jpg --methods rmeeto mtr

--model takes the Vim and VideoMamba names of ``rmeeto.create_model`` (image and video) and timm ViT/DeiT
names (wrapped by ``rmeeto.models.deit.create_deit``); --model-args overrides their architecture. Without
--methods, methods the model cannot run are skipped with the reason (DeiT has no Δ for MTR).
Writes results.csv / results.json / accuracy_vs_gflops.png under --out.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import sys
from pathlib import Path

import timm
import torch
from torch import nn

import rmeeto
from rmeeto.evaluate import (
    Row,
    accuracy,
    format_table,
    input_shape,
    rows_as_dicts,
    throughputs,
    training_free_table,
    unsupported_methods,
)
from rmeeto.flops import count, count_config
from rmeeto.models.deit import create_deit
from rmeeto.models.registry import VARIANTS, resolve_name

DEMO_DATA = Path("data/demo")
DEMO_CHECKPOINT = Path("checkpoints/vim_demo")
DEFAULT_METHODS = ["rmeeto", "prune", "mtr", "evit", "tome", "random"]


def model_arg(text: str) -> tuple[str, object]:
    """``key=value`` → (key, value as a Python literal, else the string)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vim_demo",
                   help="vim_{tiny,small,base,demo}, videomamba_{tiny,small,middle,base}, "
                        "videomamba_{tiny,small,middle}_k400_f{8,16,32,64}, videomamba_demo, "
                        "or a timm ViT/DeiT name such as deit_small_patch16_224")
    p.add_argument("--model-args", nargs="+", type=model_arg, default=[], metavar="KEY=VALUE",
                   help="architecture overrides: config fields (Vim, VideoMamba) or timm kwargs (DeiT)")
    p.add_argument("--checkpoint", type=Path,
                   help="weights (.pth/.ckpt/.safetensors; for DeiT a timm/DeiT state dict); default: the demo's")
    p.add_argument("--export", type=Path, help="an export directory (rmeeto.export.save); overrides --model")
    p.add_argument("--data", type=Path, help="webdataset shards dir (with val-index.json) or ImageFolder root; "
                                             "clip shards for a video model")
    p.add_argument("--split", default="val")
    p.add_argument("--training-free", action="store_true", help="table of methods × FLOPs cuts")
    p.add_argument("--methods", nargs="+",
                   help=f"default: {' '.join(DEFAULT_METHODS)}, less those the model cannot run")
    p.add_argument("--cuts", nargs="+", type=float, default=[0.2, 0.3, 0.4])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--speed-batch", type=int, default=8, help="batch size of the throughput runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--visualize", type=Path, help="an image: draw which patches merge, per method")
    p.add_argument("--out", type=Path, default=Path("outputs/eval"))
    args = p.parse_args(argv)
    demo = args.export is None and args.checkpoint is None and args.model == "vim_demo"
    if demo:
        args.checkpoint = DEMO_CHECKPOINT
        args.training_free = args.training_free or len(argv or sys.argv[1:]) == 0
    if args.data is None:
        if args.model != "vim_demo" and args.export is None:
            p.error("--data is required for a model other than the demo")
        from rmeeto.data.demo import ensure_demo_shards

        args.data = ensure_demo_shards(DEMO_DATA)
    return args


def load_model(args: argparse.Namespace) -> nn.Module:
    """The export, or ``--model`` with ``--model-args`` and ``--checkpoint``: an rmeeto name (Vim, VideoMamba)
    through ``rmeeto.create_model``, a timm ViT/DeiT name through ``create_deit``."""
    if args.export is not None:
        from rmeeto.export import load

        return load(args.export)
    if args.checkpoint is None:
        raise SystemExit(f"--checkpoint is required for {args.model} (the public weights are not bundled)")
    overrides = dict(args.model_args)
    try:
        resolve_name(args.model)
    except ValueError:
        if args.model not in timm.list_models():
            raise SystemExit(f"unknown model {args.model!r}: neither an rmeeto model ({', '.join(sorted(VARIANTS))}) "
                             "nor a timm ViT/DeiT name") from None
        return create_deit(args.model, pretrained=args.checkpoint, **overrides)
    return rmeeto.create_model(args.model, pretrained=args.checkpoint, **overrides)


def resolve_methods(model: nn.Module, requested: list[str] | None) -> list[str]:
    """``requested`` if the model can run all of them (else exit naming why), or the default methods less
    those it cannot run, printing each skipped one and why."""
    unsupported = unsupported_methods(model, requested or DEFAULT_METHODS)
    if requested is not None:
        if unsupported:
            raise SystemExit("\n".join(f"--methods {name}: {why}" for name, why in unsupported.items()))
        return requested
    for name, why in unsupported.items():
        print(f"skipping {name} for {type(model).__name__}: {why}")
    return [name for name in DEFAULT_METHODS if name not in unsupported]


def make_loader_factory(args: argparse.Namespace, model: nn.Module):
    """(factory of fresh evaluation loaders, number of classes) for ``model``'s input: clip shards for a
    video model, image shards or an ImageFolder tree for an image model."""
    root, shape = args.data, input_shape(model)
    shards = (root / f"{args.split}-index.json").is_file()
    if len(shape) == 4:
        if not shards:
            raise SystemExit(f"{root}: a video model reads clip shards ({args.split}-index.json), none found")
        from rmeeto.data.video import VideoDataModule

        dm = VideoDataModule(str(root), val_split=args.split, num_frames=shape[1], img_size=shape[-1],
                             batch_size=args.batch_size, num_workers=args.workers)
    elif shards:
        from rmeeto.data.webdataset_dm import WebDatasetDataModule

        dm = WebDatasetDataModule(str(root), val_split=args.split, img_size=shape[-1],
                                  batch_size=args.batch_size, num_workers=args.workers)
    elif (root / args.split).is_dir():
        from rmeeto.data.folder_dm import ImageFolderDataModule

        dm = ImageFolderDataModule(str(root), img_size=shape[-1], batch_size=args.batch_size,
                                   num_workers=args.workers)
    else:
        raise SystemExit(f"{root}: neither shards ({args.split}-index.json) nor an ImageFolder ({args.split}/)")
    dm.setup("validate")
    if dm.num_classes > model.num_classes:
        raise SystemExit(f"{root} has {dm.num_classes} classes, the model predicts {model.num_classes}")
    return dm.val_dataloader, dm.num_classes


def write_results(rows: list[Row], out: Path, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    dicts = rows_as_dicts(rows)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dicts[0]))
        writer.writeheader()
        writer.writerows(dicts)
    (out / "results.json").write_text(json.dumps(dicts, indent=2))
    from rmeeto.viz import plot_accuracy_vs_flops

    plot_accuracy_vs_flops(dicts, out / "accuracy_vs_gflops.png", title=title)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    model = load_model(args)
    loaders, num_classes = make_loader_factory(args, model)
    methods = resolve_methods(model, args.methods)
    if args.visualize:
        for path in visualize_methods(model, args.visualize, methods, args.cuts[0], args.out):
            print(f"wrote {path}")
    if args.training_free:
        rows = training_free_table(model, loaders, num_classes, methods, args.cuts, args.device,
                                   speed_batch=args.speed_batch)
        title = f"{args.model}: training-free token reduction"
    else:  # the model as loaded (an export keeps its reduction)
        rows = [evaluate_as_loaded(model, loaders, num_classes, args)]
        title = f"{args.export or args.checkpoint}"
    print(format_table(rows))
    write_results(rows, args.out, title)
    print(f"results in {args.out}/ (results.csv, results.json, accuracy_vs_gflops.png)")
    return rows


def evaluate_as_loaded(model, loaders, num_classes: int, args: argparse.Namespace) -> Row:
    """One row for the model with whatever reduction it carries; speedup against its unreduced self."""
    reducer = model.token_reducer
    acc = accuracy(model, loaders(), num_classes, args.device)
    speed, base_speed = throughputs(model, [reducer, None], args.speed_batch, device=args.device)
    gflops = count(model)
    return Row("as loaded" if reducer is None else type(reducer.method).__name__, 0.0,
               0.0 if reducer is None else float(reducer.schedule.r[0]), gflops, acc["top1"],
               acc["top5"], speed, flops_cut=1 - gflops / count_config(model.cfg), speedup=speed / base_speed)


def visualize_methods(model, image_path: Path, methods: list[str], cut: float, out: Path) -> list[Path]:
    """One PNG per method: which patches of ``image_path`` merge at each reduction point."""
    from PIL import Image

    from rmeeto.data.transforms import eval_transform
    from rmeeto.viz import draw_merge_maps, merge_maps

    image = eval_transform(model.cfg.img_size)(Image.open(image_path).convert("RGB"))
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for method in methods:
        maps = merge_maps(model, image, method, flops_cut=cut)
        path = out / f"merge_{method}_{Path(image_path).stem}.png"
        draw_merge_maps(image, maps, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    main()
