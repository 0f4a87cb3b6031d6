#!/usr/bin/env python
"""Write docs/results.md: the papers' findings checked on the digits demo, FLOPs beside the papers'
tables, and measured speed. Run after `make demo` (it reads outputs/demo/):

    .venv/bin/python scripts/results.py

Every number in the page is computed or measured by this script or read from the demo's own outputs.
"""

from __future__ import annotations

import csv
import json
import shutil
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


def retraining_curve(metrics_csv: Path, start: float) -> list[tuple[float, float]]:
    """(epochs of re-training, val top-1 %) from a Lightning CSV log, led by (0, ``start``): the
    training-free accuracy of the same reduced model."""
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    steps_per_epoch = 1 + max(int(r["step"]) for r in rows if r["epoch"] == "0")
    points = [((int(r["step"]) + 1) / steps_per_epoch, 100 * float(r["val/acc1"])) for r in rows if r.get("val/acc1")]
    return [(0.0, start), *points]


def shuffled_retrain(run_dir: Path) -> Path:
    """Re-train the demo with the odd-even shuffled order (the paper's order ablation)."""
    if not (run_dir / "export" / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs/demo.yaml"),
                        "--model.reduction", json.dumps({"method": "rmeeto", "r": 8, "order": "odd_even"}),
                        "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
                        "--checkpoint.dirpath", str(run_dir / "checkpoints"),
                        "--export.export_dir", str(run_dir / "export")], check=True, cwd=ROOT)
    return run_dir


def plot_curves(curves: dict[str, list[tuple[float, float]]], baselines: dict[str, float], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5))
    ax = fig.subplots()
    for label, points in curves.items():
        ax.plot([e for e, _ in points], [a for _, a in points], marker="o", markersize=3, label=label)
    for label, value in baselines.items():
        ax.axhline(value, linestyle="--", linewidth=1, color="grey")
        ax.annotate(label, (0, value), fontsize=7, va="bottom")
    ax.set_xlabel("re-training epoch")
    ax.set_ylabel("val top-1 (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def top1(rows: list[dict], method: str, cut: float) -> float | None:
    row = next((r for r in rows if r["method"] == method and r["target_cut"] == cut), None)
    return None if row is None else row["top1"]


def holds(claim: bool) -> str:
    return "**holds here**" if claim else "**does not hold here**"


def findings(free: list[dict], order_free: dict[str, float], order_trained: dict[str, float],
             curve: list[tuple[float, float]], summary: dict[str, float]) -> list[str]:
    """The papers' claims, each checked against the demo's numbers (every number computed here)."""
    cuts = sorted({r["target_cut"] for r in free if r["method"] != "none"})
    gaps = {c: top1(free, "rmeeto", c) - top1(free, "prune", c) for c in cuts
            if top1(free, "rmeeto", c) is not None and top1(free, "prune", c) is not None}
    gap_text = ", ".join(f"{g:+.1f} at −{c:.0%}" for c, g in gaps.items())
    widest = max(gaps, key=gaps.get)
    lines = [
        f"- **Token order matters for Mamba** (R-MeeTo §3): training-free, ordered merging scores "
        f"{order_free['ordered']:.1f} %, the odd-even shuffle {order_free['odd_even']:.1f} % and the unordered "
        f"(ToMe) layout {order_free['unordered']:.1f} %; after the same re-training "
        f"{order_trained['ordered']:.1f} % vs {order_trained['odd_even']:.1f} %. The claim "
        f"{holds(order_free['ordered'] > max(order_free['odd_even'], order_free['unordered']))} training-free"
        f" and {holds(order_trained['ordered'] > order_trained['odd_even'])} after re-training.",
        f"- **Merging beats pruning, more so as the cut grows** (R-MeeTo): merge − prune top-1 = {gap_text} "
        f"points. Merging is ahead at the largest cut: {holds(gaps[max(gaps)] > 0)}; the gap is widest at "
        f"−{widest:.0%}.",
    ]
    recovered = (summary["retrained"] - summary["free"]) / max(summary["base"] - summary["free"], 1e-9)
    first = curve[1]
    lines.append(
        f"- **Re-training wins the accuracy back quickly** (R-MeeTo: minutes): R-MeeTo r={summary['r']:g} drops "
        f"the demo Vim from {summary['base']:.1f} % to {summary['free']:.1f} % without training; after "
        f"{first[0]:.2f} epoch of re-training it is at {first[1]:.1f} %, after {curve[-1][0]:.0f} epochs "
        f"{summary['retrained']:.1f} % ({recovered:.0%} of the loss recovered, {summary['seconds']:.0f} s on "
        f"2 CPU cores). {holds(recovered > 0.5)} (more than half of the loss recovered).")
    for cut in cuts:
        scored = sorted(((top1(free, m, cut), m) for m in {r["method"] for r in free} - {"none"}
                         if top1(free, m, cut) is not None), reverse=True)
        mtr, evit = top1(free, "mtr", cut), top1(free, "evit", cut)
        if mtr is None or evit is None:
            continue
        ranking = ", ".join(f"{m} {a:.1f}" for a, m in scored)
        lines.append(f"- **MTR vs EViT and the others at −{cut:.0%} FLOPs, training-free** (MTR Table 1): "
                     f"{ranking}. MTR ahead of EViT {holds(mtr > evit)}; MTR best of all "
                     f"{holds(scored[0][1] == 'mtr')}.")
    lines.append("- On 360 validation images one image is 0.28 points; differences of a point or two are noise.")
    return lines


def main() -> None:
    torch.manual_seed(0)
    DOCS.mkdir(exist_ok=True)
    free = load_rows(DEMO / "training_free" / "results.json")
    retrained = load_rows(DEMO / "retrained" / "results.json")
    from demo import val_loaders  # the demo's own evaluation data

    loaders, num_classes = val_loaders(ROOT / "data" / "demo", 64)
    base = rmeeto.create_model("vim_demo", pretrained=ROOT / "checkpoints" / "vim_demo").eval()
    exported = rmeeto.export.load(DEMO / "run" / "export")
    r, blocks = exported.token_reducer.schedule.r[0], exported.token_reducer.schedule.blocks
    torch.set_grad_enabled(False)
    base_top1 = accuracy(base, loaders(), num_classes, desc="unreduced")["top1"]
    order_free = {}
    for order in ("ordered", "odd_even", "unordered"):
        R.apply(base, "rmeeto", r=r, blocks=blocks, order=order)
        order_free[order] = accuracy(base, loaders(), num_classes, desc=order)["top1"]
    R.remove(base)
    shuffled = rmeeto.export.load(shuffled_retrain(DEMO / "run_shuffled") / "export")
    order_trained = {"ordered": accuracy(exported, loaders(), num_classes, desc="re-trained")["top1"],
                     "odd_even": accuracy(shuffled, loaders(), num_classes, desc="shuffled")["top1"]}
    torch.set_grad_enabled(True)
    curves = {"R-MeeTo ordered": retraining_curve(DEMO / "run" / "logs" / "version_0" / "metrics.csv",
                                                  order_free["ordered"]),
              "odd-even shuffled": retraining_curve(DEMO / "run_shuffled" / "logs" / "version_0" / "metrics.csv",
                                                    order_free["odd_even"])}
    plot_curves(curves, {"unreduced": base_top1}, DOCS / "results_retraining.png")
    seconds = json.loads((DEMO / "summary.json").read_text())["retrain_seconds"]
    summary = {"base": base_top1, "free": order_free["ordered"], "retrained": order_trained["ordered"], "r": r,
               "seconds": seconds}
    shutil.copy(DEMO / "training_free" / "accuracy_vs_gflops.png", DOCS / "results_training_free.png")
    methods = [m for m in dict.fromkeys(r["method"] for r in free) if m != "none"]
    ordered_curve = curves["R-MeeTo ordered"]
    page = [
        "# Results", "",
        "Produced by `scripts/results.py` after `make demo` and `make bench`, on this project's CPU machine (2 cores,",
        "AMD EPYC). Demo numbers come from the digits demo (a tiny Vim, 64×64 images, 65 tokens, 360 validation",
        "images). ImageNet numbers need the public weights and ImageNet, which this machine does not have: no",
        "ImageNet accuracy is claimed here.", "",
        "## Do the papers' findings hold on the demo?", "",
        *findings(free, order_free, order_trained, ordered_curve, summary), "",
        "## FLOPs beside the papers' tables", "", *flops_table(), "",
        "## The demo run (make demo)", "", (DEMO / "summary.md").read_text().strip(), "",
        "## Training-free: methods at equal FLOPs (demo checkpoint, top-1 %)", "",
        *method_table(free, methods), "", "![accuracy vs GFLOPs](results_training_free.png)", "",
        f"The same reducers on the weights re-trained with R-MeeTo r={r:g} (top-1 %):", "",
        *method_table(retrained, methods), "",
        f"## Token order (R-MeeTo r={r:g}, blocks {'/'.join(map(str, blocks))}, top-1 %)", "",
        "| order | training-free | re-trained (demo recipe) |", "|---|---|---|",
        f"| ordered (R-MeeTo) | {order_free['ordered']:.2f} | {order_trained['ordered']:.2f} |",
        f"| odd-even shuffle | {order_free['odd_even']:.2f} | {order_trained['odd_even']:.2f} |",
        f"| unordered (ToMe layout) | {order_free['unordered']:.2f} | – |", "",
        "## Re-training: how fast accuracy comes back", "", "![re-training curves](results_retraining.png)", "",
        "| epochs of re-training | " + " | ".join(curves) + " |", "|---" * (len(curves) + 1) + "|",
        *[f"| {ordered_curve[i][0]:.2f} | " + " | ".join(f"{c[i][1]:.2f}" if i < len(c) else "–"
                                                    for c in curves.values()) + " |"
          for i in range(len(ordered_curve))], "",
        "## Speed on this CPU", "", "Selective-scan backends (`benchmarks/bench_scan.py`):", "",
        "```", bench_text("bench_scan.txt"), "```", "", "Vim-S (`benchmarks/bench_model.py`):", "",
        "```", bench_text("bench_model.txt"), "```", "",
        "No GPU was available to this session; GPU speed is not measured here.",
    ]
    (DOCS / "results.md").write_text("\n".join(page) + "\n")
    print(f"wrote {DOCS / 'results.md'}")


def bench_text(name: str) -> str:
    """A benchmark's saved output (`make bench` writes outputs/demo/bench_*.txt), profiler chatter removed."""
    path = DEMO / name
    if not path.is_file():
        return f"(missing: run `make bench` to write {path.relative_to(ROOT)})"
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith(("USDT:", "ERROR:", "WARNING:"))).strip()


if __name__ == "__main__":
    main()
