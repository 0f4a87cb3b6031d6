#!/usr/bin/env python
"""The whole story on the bundled digits demo, on a CPU in a few minutes.

1. training-free table: the demo Vim with every reducer at 10/20/30 % fewer FLOPs;
2. R-MeeTo re-training of the merged model for a few epochs (train.py, configs/demo.yaml);
3. the same table for the re-trained weights, and the exported re-trained model;
4. a summary. Everything lands in outputs/demo/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import rmeeto
import rmeeto.reduction as R
from rmeeto.data.demo import ensure_demo_shards
from rmeeto.evaluate import accuracy, format_table, rows_as_dicts, throughputs, training_free_table
from rmeeto.export import load as load_export
from rmeeto.flops import count, count_config

OUT = Path("outputs/demo")
CHECKPOINT = Path("checkpoints/vim_demo")
CONFIG = "configs/demo.yaml"
METHODS = ["rmeeto", "prune", "mtr", "evit", "tome", "random"]
CUTS = [0.1, 0.2, 0.3]  # three merge points in 8 blocks cannot take bipartite merging to −40 %
SPEED_BATCH = 64  # at batch 8 this 26-MFLOP model is all per-op overhead: speed would not follow FLOPs


def val_loaders(root: Path, img_size: int):
    from rmeeto.data.webdataset_dm import WebDatasetDataModule

    dm = WebDatasetDataModule(str(root), img_size=img_size, batch_size=120, num_workers=1)
    dm.setup("validate")
    return dm.val_dataloader, dm.num_classes


def table(title: str, model, loaders, num_classes: int, out: Path) -> list:
    from rmeeto.viz import plot_accuracy_vs_flops

    print(f"\n== {title} ==")
    rows = training_free_table(model, loaders, num_classes, METHODS, CUTS, speed_batch=SPEED_BATCH)
    print(format_table(rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows_as_dicts(rows), indent=2))
    plot_accuracy_vs_flops(rows_as_dicts(rows), out / "accuracy_vs_gflops.png", title=title)
    return rows


def retrain(run_dir: Path) -> float:
    """R-MeeTo re-training with the demo recipe; returns wall seconds."""
    import train

    start = time.perf_counter()
    train.main(["fit", "--config", CONFIG, "--model.pretrained", str(CHECKPOINT),
                "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
                "--checkpoint.dirpath", str(run_dir / "checkpoints"), "--export.export_dir", str(run_dir / "export")])
    return time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    shards = ensure_demo_shards(Path("data/demo"))
    if not CHECKPOINT.exists():
        raise SystemExit(f"{CHECKPOINT} missing: rebuild it with "
                         "`.venv/bin/python train.py fit --config configs/demo_pretrain.yaml`")
    base = rmeeto.create_model("vim_demo", pretrained=CHECKPOINT)
    loaders, num_classes = val_loaders(shards, base.cfg.img_size)
    table("demo Vim, training-free", base, loaders, num_classes, OUT / "training_free")

    print("\n== R-MeeTo re-training (configs/demo.yaml) ==")
    seconds = retrain(OUT / "run")
    retrained = load_export(OUT / "run" / "export")
    torch.set_grad_enabled(False)
    reduction = retrained.token_reducer
    r, blocks = reduction.schedule.r[0], reduction.schedule.blocks
    merged_acc = accuracy(retrained, loaders(), num_classes, desc="re-trained")
    base_acc = accuracy(base, loaders(), num_classes)
    free = R.apply(base, "rmeeto", r=r, blocks=blocks)
    free_acc = accuracy(base, loaders(), num_classes, desc="training-free")
    base_speed, merged_speed = throughputs(base, [None, free], SPEED_BATCH)
    gflops_merged, gflops_base = count(base), count_config(base.cfg)
    R.remove(retrained)
    table("re-trained weights, training-free reducers", retrained, loaders, num_classes, OUT / "retrained")

    summary = [
        f"| model (digits val, {merged_acc['samples']} images) | GFLOPs | top-1 | images/s (batch {SPEED_BATCH}) |",
        "|---|---|---|---|",
        f"| unreduced demo Vim | {gflops_base:.4f} | {base_acc['top1']:.2f} | {base_speed:.0f} |",
        f"| R-MeeTo r={r:g} at blocks {list(blocks)}, no training | {gflops_merged:.4f} | "
        f"{free_acc['top1']:.2f} | {merged_speed:.0f} |",
        f"| R-MeeTo r={r:g}, re-trained ({seconds:.0f} s) | {gflops_merged:.4f} | {merged_acc['top1']:.2f} | "
        f"{merged_speed:.0f} |",
    ]
    (OUT / "summary.md").write_text("\n".join(summary) + "\n")
    numbers = {"r": r, "blocks": list(blocks), "gflops": [gflops_base, gflops_merged], "retrain_seconds": seconds,
               "top1": {"unreduced": base_acc["top1"], "training_free": free_acc["top1"],
                        "retrained": merged_acc["top1"]},
               "images_per_s": {"unreduced": base_speed, "merged": merged_speed, "batch": SPEED_BATCH}}
    (OUT / "summary.json").write_text(json.dumps(numbers, indent=2))
    print("\n== Summary ==\n" + "\n".join(summary))
    print(f"\nMerging tokens cut FLOPs by {1 - gflops_merged / gflops_base:.0%} and ran "
          f"{merged_speed / base_speed:.2f}× as fast on this CPU. Without training it scored "
          f"{free_acc['top1']:.1f}% (unreduced {base_acc['top1']:.1f}%); {seconds:.0f} s of re-training "
          f"brought it to {merged_acc['top1']:.1f}%.")
    print(f"Tables, plots and the exported model: {OUT}/ (export: {OUT / 'run' / 'export'})")


if __name__ == "__main__":
    main()
