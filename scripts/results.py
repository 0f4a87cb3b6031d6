#!/usr/bin/env python
"""Write docs/results.md: the papers' findings checked on the digits demo, FLOPs beside the papers'
tables, and measured speed. Run after `make demo` (it reads outputs/demo/):

    .venv/bin/python scripts/results.py

Every number in the page is computed or measured by this script or read from the demo's own outputs.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import torch

import rmeeto
import rmeeto.reduction as R
from rmeeto.evaluate import accuracy
from rmeeto.flops import count_config
from rmeeto.models import model_config
from rmeeto.reduction.methods import BipartiteMerge
from rmeeto.reduction.reducer import Schedule

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "outputs" / "demo"
DOCS = ROOT / "docs"
sys.path.insert(0, str(ROOT))


def flops_table() -> list[str]:
    """Vim-Ti/S/B GFLOPs before and after R-MeeTo (r = 5/11/11, blocks 2, 4, …, 22) vs the papers."""
    paper = {"vim_tiny": (1.45, 1.28, 5), "vim_small": (5.08, 3.58, 11), "vim_base": (18.87, 13.21, 11)}
    lines = ["| model | GFLOPs (ours) | paper | R-MeeTo GFLOPs (ours) | paper | r |", "|---|---|---|---|---|---|"]
    for name, (base, merged, r) in paper.items():
        cfg = model_config(name)
        ours = count_config(cfg), count_config(cfg, BipartiteMerge(), Schedule.every(cfg.depth, r))
        lines.append(f"| {name} | {ours[0]:.3f} | {base} | {ours[1]:.3f} | {merged} | {r} |")
    return lines


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def method_table(rows: list[dict], methods: list[str]) -> list[str]:
    """top-1 per method (rows) and FLOPs cut (columns)."""
    cuts = sorted({r["target_cut"] for r in rows if r["method"] != "none"})
    base = next(r for r in rows if r["method"] == "none")
    lines = ["| method | " + " | ".join(f"−{c:.0%} FLOPs" for c in cuts) + " |", "|---" * (len(cuts) + 1) + "|",
             f"| none (unreduced, {base['gflops']:.4f} GFLOPs) | " + " | ".join(f"{base['top1']:.2f}" for _ in cuts)
             + " |"]
    for method in methods:
        cells = []
        for cut in cuts:
            row = next((r for r in rows if r["method"] == method and r["target_cut"] == cut), None)
            cells.append("–" if row is None else f"{row['top1']:.2f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def epoch_curve(metrics_csv: Path) -> list[tuple[int, float]]:
    """(epoch, val top-1) from a Lightning CSV log."""
    with open(metrics_csv) as f:
        return [(int(row["epoch"]), 100 * float(row["val/acc1"])) for row in csv.DictReader(f) if row.get("val/acc1")]


def shuffled_retrain(run_dir: Path) -> Path:
    """Re-train the demo with the odd-even shuffled order (the paper's order ablation)."""
    if not (run_dir / "export" / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs/demo.yaml"),
                        "--model.reduction", json.dumps({"method": "rmeeto", "r": 8, "order": "odd_even"}),
                        "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
                        "--checkpoint.dirpath", str(run_dir / "checkpoints"),
                        "--export.export_dir", str(run_dir / "export")], check=True, cwd=ROOT)
    return run_dir


def plot_curves(curves: dict[str, list[tuple[int, float]]], baselines: dict[str, float], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for label, points in curves.items():
        ax.plot([e + 1 for e, _ in points], [a for _, a in points], marker="o", label=label)
    for label, value in baselines.items():
        ax.axhline(value, linestyle="--", linewidth=1, color="grey")
        ax.annotate(label, (1, value), fontsize=7, va="bottom")
    ax.set_xlabel("re-training epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    torch.manual_seed(0)
    DOCS.mkdir(exist_ok=True)
    free = load_rows(DEMO / "training_free" / "results.json")
    retrained = load_rows(DEMO / "retrained" / "results.json")
    from demo import val_loaders  # the demo's own evaluation data

    loaders, num_classes = val_loaders(ROOT / "data" / "demo", 64)
    base = rmeeto.create_model("vim_demo", pretrained=ROOT / "checkpoints" / "vim_demo").eval()
    torch.set_grad_enabled(False)
    order_free = {}
    for order in ("ordered", "odd_even", "unordered"):
        R.apply(base, "rmeeto", r=8, order=order)
        order_free[order] = accuracy(base, loaders(), num_classes, desc=order)["top1"]
    R.remove(base)
    shuffled = rmeeto.export.load(shuffled_retrain(DEMO / "run_shuffled") / "export")
    order_trained = {"ordered": accuracy(rmeeto.export.load(DEMO / "run" / "export"), loaders(), num_classes)["top1"],
                     "odd_even": accuracy(shuffled, loaders(), num_classes)["top1"]}
    torch.set_grad_enabled(True)
    curves = {"R-MeeTo ordered": epoch_curve(DEMO / "run" / "logs" / "version_0" / "metrics.csv"),
              "odd-even shuffled": epoch_curve(DEMO / "run_shuffled" / "logs" / "version_0" / "metrics.csv")}
    plot_curves(curves, {"training-free ordered": order_free["ordered"],
                         "unreduced": next(r["top1"] for r in free if r["method"] == "none")},
                DOCS / "results_retraining.png")
    summary = (DEMO / "summary.md").read_text()
    import shutil

    shutil.copy(DEMO / "training_free" / "accuracy_vs_gflops.png", DOCS / "results_training_free.png")
    methods = ["rmeeto", "prune", "mtr", "evit", "tome", "random"]
    page = [
        "# Results", "",
        "Produced by `scripts/results.py` after `make demo`, on this project's CPU machine (2 cores). Demo",
        "numbers come from the digits demo (a tiny Vim, 64×64 images, 65 tokens, 360 validation images), so",
        "one image is 0.28 points of top-1: small differences are noise. ImageNet numbers need the public",
        "weights and ImageNet, which this machine does not have; no ImageNet accuracy is claimed here.", "",
        "## FLOPs beside the papers' tables", "", *flops_table(), "",
        "## The demo run (make demo)", "", summary, "",
        "## Training-free: methods at equal FLOPs (demo checkpoint, top-1 %)", "",
        *method_table(free, methods), "", "![accuracy vs GFLOPs](results_training_free.png)", "",
        "The same reducers on the re-trained weights (re-trained with R-MeeTo at its own r):", "",
        *method_table(retrained, methods), "",
        "## Token order (R-MeeTo r=8, blocks 2/4/6, top-1 %)", "",
        "| order | training-free | re-trained (demo recipe) |", "|---|---|---|",
        f"| ordered (R-MeeTo) | {order_free['ordered']:.2f} | {order_trained['ordered']:.2f} |",
        f"| odd-even shuffle | {order_free['odd_even']:.2f} | {order_trained['odd_even']:.2f} |",
        f"| unordered (ToMe layout) | {order_free['unordered']:.2f} | – |", "",
        "## Re-training: how fast accuracy comes back", "", "![re-training curves](results_retraining.png)", "",
        "| epoch | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|",
        *[f"| {i + 1} | " + " | ".join(f"{c[i][1]:.2f}" if i < len(c) else "–" for c in curves.values()) + " |"
          for i in range(max(len(c) for c in curves.values()))], "",
        "## Speed on this CPU", "", "```", (DEMO / "bench_model.txt").read_text().strip()
        if (DEMO / "bench_model.txt").is_file() else "(run `make bench > outputs/demo/bench_model.txt` first)",
        "```", "", "No GPU was available to this session; GPU speed is not measured here.",
    ]
    (DOCS / "results.md").write_text("\n".join(page) + "\n")
    print(f"wrote {DOCS / 'results.md'}")


if __name__ == "__main__":
    main()
