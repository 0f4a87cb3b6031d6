#!/usr/bin/env python
"""R-MeeTo's order study on the demo DeiT: does the token order after merging matter for a ViT?

On checkpoints/deit_demo (configs/demo_deit_pretrain.yaml) and the digits validation shards:

1. training-free top-1 of the ordered (R-MeeTo), unordered (ToMe's layout) and odd-even shuffled layouts,
   merging inside every block with proportional attention (the authors' DeiT placement, methods.md §5)
   and, at the same FLOPs cut, between blocks 2 and 4 (the Vim placement);
2. the same three in-block layouts after the Vim demo's short re-training (configs/demo_deit.yaml);
3. ``OUT/order_study.json`` and ``OUT/order_study.png`` (docs/order_study.md shows them).

    python scripts/order_study.py                       # ~15 min on 2 shared CPU cores
    python scripts/order_study.py --skip-retrain        # step 1 only
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import rmeeto
import rmeeto.reduction as R
from rmeeto.data.demo import ensure_demo_shards
from rmeeto.evaluate import accuracy, eval_datamodule
from rmeeto.flops import count, count_config
from rmeeto.lit.cli import main as train_main

#: Layout → the method that merges with it.
LAYOUTS = {"ordered": "rmeeto", "unordered": "tome", "odd_even": "shuffle"}
PLACEMENTS = ("in_block", "between")


def top1(model, loaders, num_classes: int, desc: str) -> float:
    return accuracy(model, loaders(), num_classes, desc=desc)["top1"]


def training_free(model, loaders, num_classes: int, r: int) -> tuple[list[dict], float]:
    """Rows (placement, layout, r, GFLOPs, top-1) for both placements; the between placement gets the
    in-block placement's FLOPs cut. Returns the rows and that cut."""
    base = count_config(model.cfg)
    rows = [{"placement": "none", "layout": "unreduced", "r": 0, "gflops": base,
             "top1": top1(model, loaders, num_classes, "unreduced")}]
    R.apply(model, "rmeeto", r=r)
    cut = 1 - count(model) / base
    for placement in PLACEMENTS:
        for layout, method in LAYOUTS.items():
            amount = {"r": r} if placement == "in_block" else {"flops_cut": cut}
            reducer = R.apply(model, method, placement=placement, **amount)
            rows.append({"placement": placement, "layout": layout, "r": reducer.schedule.r[0],
                         "blocks": list(reducer.schedule.blocks), "gflops": count(model),
                         "top1": top1(model, loaders, num_classes, f"{placement} {layout}")})
            print(rows[-1], flush=True)
    R.remove(model)
    return rows, cut


def retrain(layout: str, r: int, epochs: int, run_dir: Path, loaders, num_classes: int) -> dict:
    """The demo re-training recipe (``epochs`` of it) with ``layout`` inside every block; top-1 of the
    re-trained student."""
    start = time.perf_counter()
    cli = train_main(["fit", "--config", "configs/demo_deit.yaml", "--model.reduction.method", LAYOUTS[layout],
                      "--model.reduction.r", str(r), "--trainer.max_epochs", str(epochs),
                      "--trainer.val_check_interval", "1.0",
                      "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir",
                      str(run_dir), "--checkpoint.dirpath", str(run_dir / "checkpoints")])
    seconds = time.perf_counter() - start
    model = cli.model.model
    return {"placement": "in_block", "layout": layout, "r": r, "epochs": epochs, "gflops": count(model),
            "seconds": seconds,
            "top1": top1(model, loaders, num_classes, f"re-trained {layout}")}


def plot(free: list[dict], retrained: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = free[0]["top1"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.27
    groups = [("in-block, training-free", [row for row in free if row["placement"] == "in_block"]),
              ("between, training-free", [row for row in free if row["placement"] == "between"]),
              ("in-block, re-trained", retrained)]
    for i, layout in enumerate(LAYOUTS):
        values = [next((row["top1"] for row in rows if row["layout"] == layout), math.nan) for _, rows in groups]
        bars = ax.bar([g + (i - 1) * width for g in range(len(groups))], values, width, label=layout)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.axhline(base, color="k", ls="--", lw=1, label=f"unreduced ({base:.1f})")
    ax.set_xticks(range(len(groups)), [name for name, _ in groups])
    ax.set_ylabel("top-1 (%), digits val")
    low = min(row["top1"] for _, rows in groups for row in rows)
    ax.set_ylim(max(0, low - 10), 100)
    ax.set_title(f"Demo DeiT: token order after merging (−{free[1]['cut']:.0%} FLOPs)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown_table(free: list[dict], retrained: list[dict]) -> str:
    """The study as a Markdown table: one row per layout, top-1 per placement / stage."""
    base = free[0]
    lines = [f"unreduced demo DeiT: {base['gflops']:.4f} GFLOPs, top-1 {base['top1']:.2f} %", "",
             "| layout | in-block, training-free | between (blocks " + ", ".join(
                 str(b) for b in next(r for r in free if r["placement"] == "between")["blocks"])
             + "), training-free | in-block, re-trained |",
             "|---|---|---|---|"]
    columns = ([r for r in free if r["placement"] == "in_block"], [r for r in free if r["placement"] == "between"],
               retrained)
    for layout in LAYOUTS:
        cells = []
        for rows in columns:
            row = next((r for r in rows if r["layout"] == layout), None)
            cut = None if row is None else 1 - row["gflops"] / base["gflops"]
            cells.append("–" if row is None else f"{row['top1']:.2f} (r={row['r']:g}, −{cut:.1%})")
        lines.append(f"| {layout} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/deit_demo")
    parser.add_argument("--r", type=int, default=6, help="tokens merged per block (in-block placement)")
    parser.add_argument("--out", type=Path, default=Path("outputs/order_study"))
    parser.add_argument("--epochs", type=int, default=3, help="re-training epochs (the Vim demo's recipe: 3)")
    parser.add_argument("--skip-retrain", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    shards = ensure_demo_shards(Path("data/demo"))
    model = rmeeto.create_model("deit_demo", pretrained=args.checkpoint).eval()
    dm = eval_datamodule(shards, model, batch_size=120, workers=1)  # normalised as the shards' index says
    loaders, num_classes = dm.val_dataloader, dm.num_classes
    free, cut = training_free(model, loaders, num_classes, args.r)
    for row in free[1:]:
        row["cut"] = 1 - row["gflops"] / free[0]["gflops"]
    retrained = [] if args.skip_retrain else [
        retrain(layout, args.r, args.epochs, args.out / f"run_{layout}", loaders, num_classes) for layout in LAYOUTS]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": args.checkpoint, "val_images": 360, "r": args.r, "epochs": args.epochs, "in_block_cut": cut,
              "training_free": free, "retrained": retrained}
    (args.out / "order_study.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(free, retrained, args.out / "order_study.png")
    (args.out / "order_study.md").write_text(markdown_table(free, retrained))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
