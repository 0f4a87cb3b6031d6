#!/usr/bin/env python
"""Evaluate Vision Mamba models with token reduction.

    python eval.py                                   # the bundled demo: training-free table
    python eval.py --training-free --model vim_small \\
        --checkpoint vim_s_midclstok_80p5acc.pth --data /imagenet-shards
    python eval.py --export outputs/demo/export      # a re-trained, exported model as it is
    python eval.py --visualize cat.jpg --methods rmeeto mtr

Writes results.csv / results.json / accuracy_vs_gflops.png under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

import rmeeto
from rmeeto.evaluate import Row, accuracy, format_table, rows_as_dicts, throughput, training_free_table
from rmeeto.flops import count, count_config

DEMO_DATA = Path("data/demo")
DEMO_CHECKPOINT = Path("checkpoints/vim_demo")
DEFAULT_METHODS = ["rmeeto", "prune", "mtr", "evit", "tome", "random"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vim_demo", help="vim_tiny | vim_small | vim_base | vim_demo")
    p.add_argument("--checkpoint", type=Path, help="weights (.pth/.ckpt/.safetensors); default: the demo's")
    p.add_argument("--export", type=Path, help="an export directory (rmeeto.export.save); overrides --model")
    p.add_argument("--data", type=Path, help="webdataset shards dir (with val-index.json) or ImageFolder root")
    p.add_argument("--split", default="val")
    p.add_argument("--training-free", action="store_true", help="table of methods × FLOPs cuts")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
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


def load_model(args: argparse.Namespace) -> rmeeto.models.VisionMamba:
    if args.export is not None:
        from rmeeto.export import load

        return load(args.export)
    if args.checkpoint is None:
        raise SystemExit(f"--checkpoint is required for {args.model} (the public Vim weights are not bundled)")
    return rmeeto.create_model(args.model, pretrained=args.checkpoint)


def make_loader_factory(args: argparse.Namespace, img_size: int):
    """(factory of fresh evaluation loaders, number of classes) for shards or an ImageFolder tree."""
    root = args.data
    if (root / f"{args.split}-index.json").is_file():
        from rmeeto.data.webdataset_dm import WebDatasetDataModule

        dm = WebDatasetDataModule(str(root), val_split=args.split, img_size=img_size,
                                  batch_size=args.batch_size, num_workers=args.workers)
    elif (root / args.split).is_dir():
        from rmeeto.data.folder_dm import ImageFolderDataModule

        dm = ImageFolderDataModule(str(root), img_size=img_size, batch_size=args.batch_size,
                                   num_workers=args.workers)
    else:
        raise SystemExit(f"{root}: neither shards ({args.split}-index.json) nor an ImageFolder ({args.split}/)")
    dm.setup("validate")
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
    loaders, num_classes = make_loader_factory(args, model.cfg.img_size)
    if args.visualize:
        for path in visualize_methods(model, args.visualize, args.methods, args.cuts[0], args.out):
            print(f"wrote {path}")
    if args.training_free:
        rows = training_free_table(model, loaders, num_classes, args.methods, args.cuts, args.device,
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
    speed = throughput(model, args.speed_batch, model.cfg.img_size, args.device)
    model.token_reducer = None
    base_speed = throughput(model, args.speed_batch, model.cfg.img_size, args.device)
    model.token_reducer = reducer
    gflops = count(model)
    return Row("as loaded" if reducer is None else type(reducer.method).__name__, 0.0,
               0.0 if reducer is None else float(reducer.schedule.amounts[0]), gflops, acc["top1"],
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
