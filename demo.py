#!/usr/bin/env python
"""The whole story on the bundled digits demo, on a CPU in a few minutes.

1. training-free table: the demo Vim with every reducer at 10/20/30 % fewer FLOPs, and random dropping over
   several seeds at equal FLOPs and at MTR's token count (rmeeto.findings);
2. R-MeeTo re-training of the merged model for a few epochs (train.py, configs/demo.yaml);
3. the same table for the re-trained weights, with the re-trained reducer as its last row, and the export;
4. a summary, whose speeds are that last row's. Everything lands in outputs/demo/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

import rmeeto.reduction as R
from rmeeto.demo_recipe import CUTS, METHODS, SPEED_BATCH, load_base, retrain, val_data
from rmeeto.evaluate import (
    Config,
    Row,
    accuracy,
    add_speeds,
    evaluate_configs,
    format_table,
    plan_configs,
    reduction_r,
    rows_as_dicts,
)
from rmeeto.export import load as load_export
from rmeeto.findings import as_dicts, format_random_rows, random_baseline
from rmeeto.ops import backend_summary

OUT = Path("outputs/demo")


def table(title: str, model, dm, out: Path, extra: list[Config] = ()) -> list[Row]:
    """The training-free table of ``model`` (plus ``extra`` configurations as last rows), printed and saved."""
    from rmeeto.viz import plot_accuracy_vs_flops

    print(f"\n== {title} ==")
    configs = plan_configs(model, METHODS, CUTS) + list(extra)
    rows = evaluate_configs(model, dm.val_dataloader, dm.num_classes, configs)
    add_speeds(rows, model, [c.reducer for c in configs], SPEED_BATCH)
    print(format_table(rows))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows_as_dicts(rows), indent=2))
    plot_accuracy_vs_flops(rows_as_dicts(rows), out / "accuracy_vs_gflops.png", title=title)
    return rows


def speed_sentence(row: Row) -> str:
    """How fast the merged model ran, with the spread, and why it is short of the FLOPs promise if it is."""
    text = (f"ran {row.speedup:.2f}× as fast (±{row.speedup_spread:.0%} over {row.speed_reps} interleaved rounds, "
            f"batch {SPEED_BATCH}) where the FLOPs promise {row.flops_speedup:.2f}×")
    return text + (f" ({row.note})" if row.note else "")


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    base = load_base()
    dm = val_data(base)
    print(backend_summary("cpu"))
    torch.set_grad_enabled(False)
    table("demo Vim, training-free", base, dm, OUT / "training_free")
    print("\n== random dropping over seeds, at equal FLOPs and at MTR's tokens ==")
    random_rows = random_baseline(base, dm.val_dataloader, dm.num_classes, CUTS)
    print(format_random_rows(random_rows))
    (OUT / "training_free" / "random_baseline.json").write_text(json.dumps(as_dicts(random_rows), indent=2))

    print("\n== R-MeeTo re-training (configs/demo.yaml) ==")
    seconds = retrain(OUT / "run")
    retrained = load_export(OUT / "run" / "export")
    reducer = retrained.token_reducer
    r, blocks = reduction_r(reducer), reducer.schedule.blocks
    base_acc = accuracy(base, dm.val_dataloader(), dm.num_classes, desc="unreduced")
    R.apply(base, "rmeeto", r=r, blocks=blocks)
    free_acc = accuracy(base, dm.val_dataloader(), dm.num_classes, desc="training-free")
    R.remove(base)
    R.remove(retrained)
    recipe = Config(f"rmeeto r={r:g} (re-trained)", 0.0, reducer)
    rows = table("re-trained weights, training-free reducers", retrained, dm, OUT / "retrained", [recipe])
    unreduced, merged = rows[0], rows[-1]

    summary = [
        f"| model (digits val, {base_acc['samples']} images) | GFLOPs | top-1 | images/s (batch {SPEED_BATCH}) |",
        "|---|---|---|---|",
        f"| unreduced demo Vim | {unreduced.gflops:.4f} | {base_acc['top1']:.2f} | {unreduced.images_per_s:.0f} |",
        f"| R-MeeTo r={r:g} at blocks {list(blocks)}, no training | {merged.gflops:.4f} | "
        f"{free_acc['top1']:.2f} | {merged.images_per_s:.0f} |",
        f"| R-MeeTo r={r:g}, re-trained ({seconds:.0f} s) | {merged.gflops:.4f} | {merged.top1:.2f} | "
        f"{merged.images_per_s:.0f} |",
    ]
    (OUT / "summary.md").write_text("\n".join(summary) + "\n")
    numbers = {"r": r, "blocks": list(blocks), "gflops": [unreduced.gflops, merged.gflops],
               "retrain_seconds": seconds,
               "top1": {"unreduced": base_acc["top1"], "training_free": free_acc["top1"], "retrained": merged.top1},
               "images_per_s": {"unreduced": unreduced.images_per_s, "merged": merged.images_per_s,
                                "batch": SPEED_BATCH},
               "speedup": {"median": merged.speedup, "iqr": merged.speedup_spread, "rounds": merged.speed_reps,
                           "trusted": merged.speed_trusted, "flops_promise": merged.flops_speedup}}
    (OUT / "summary.json").write_text(json.dumps(numbers, indent=2))
    print("\n== Summary (speeds: the last row of the table above) ==\n" + "\n".join(summary))
    print(f"\nMerging tokens cut FLOPs by {merged.flops_cut:.0%} and {speed_sentence(merged)} on this CPU. "
          f"Without training it scored {free_acc['top1']:.1f}% (unreduced {base_acc['top1']:.1f}%); "
          f"{seconds:.0f} s of re-training brought it to {merged.top1:.1f}%.")
    print(f"Tables, plots and the exported model: {OUT}/ (export: {OUT / 'run' / 'export'}); "
          f"the demo took {(time.perf_counter() - start) / 60:.1f} minutes.")


if __name__ == "__main__":
    main()
