#!/usr/bin/env python
"""Write docs/results.md: the papers' findings checked on the digits demo, FLOPs beside the papers'
tables, and measured speed. Run after `make demo` (it reads outputs/demo/):

    .venv/bin/python scripts/results.py

Every number in the page is computed or measured by this script or read from the demo's own outputs.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
from pathlib import Path

import torch

import rmeeto
import rmeeto.reduction as R
from rmeeto.demo_recipe import CUTS, METHODS, load_base, retrain, val_data
from rmeeto.evaluate import (
    accuracy,
    eval_datamodule,
    evaluate_configs,
    model_normalisation,
    plan_configs,
    rows_as_dicts,
)
from rmeeto.findings import RandomRow, as_dicts, format_random_rows, random_baseline
from rmeeto.flops import count_config
from rmeeto.models import model_config
from rmeeto.reduction.methods import BipartiteMerge
from rmeeto.reduction.reducer import Schedule

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "outputs" / "demo"
DOCS = ROOT / "docs"


def cpu_name() -> str:
    """The CPU's model name as the kernel reports it (/proc/cpuinfo), else the platform's."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """Names of the CUDA GPUs this process sees (none without CUDA)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def machine_line() -> str:
    """What ran the numbers below: CPU model and core count, and the GPUs or their absence."""
    gpus = gpu_names()
    gpu_text = (f"GPU: {', '.join(gpus)}; the speeds below are CPU speeds" if gpus else
                "no GPU was visible to this run, so no GPU speed is measured here; GPU figures: [cuda.md](cuda.md)")
    return f"{cpu_name()}, {os.cpu_count()} cores; {gpu_text}"


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
    cuts = sorted({r["target_cut"] for r in rows if r["method"] in methods})
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
        retrain(run_dir, "--model.reduction", json.dumps({"method": "shuffle", "r": 8}), root=ROOT)
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


def noise_points(top1: float, images: int) -> float:
    """Half-width of a 95 % binomial interval, in points, of a top-1 of ``top1`` % on ``images`` images."""
    p = top1 / 100
    return 196 * (p * (1 - p) / images) ** 0.5


def random_findings(rows: list[dict], images: int, setting: str) -> list[str]:
    """MTR against random dropping over several seeds, at equal FLOPs and at MTR's token count."""
    lines = []
    for cut in sorted({r["cut"] for r in rows}):
        at = {r["match"]: r for r in rows if r["cut"] == cut}
        flops, tokens = at["flops"], at["tokens"]
        mtr, noise = flops["mtr_top1"], noise_points(flops["mtr_top1"], images)
        lines.append(
            f"- **MTR vs random dropping at −{cut:.0%} FLOPs** ({setting}, {len(flops['top1_seeds'])} seeds): MTR "
            f"{mtr:.1f} %; random at equal FLOPs {flops['top1_mean']:.1f} ± {flops['top1_std']:.1f} % "
            f"(r={flops['r']:.4g}, it removes fewer tokens, MTR pays for its matching), random at MTR's tokens "
            f"(r={tokens['r']:.4g}) "
            f"{tokens['top1_mean']:.1f} ± {tokens['top1_std']:.1f} %. MTR ahead at equal FLOPs "
            f"{holds(mtr > flops['top1_mean'])}, at equal tokens {holds(mtr > tokens['top1_mean'])}; "
            f"{'beyond' if abs(mtr - tokens['top1_mean']) > noise + tokens['top1_std'] else 'within'} the noise "
            f"(±{noise:.1f} points, 95 % on {images} images, plus the seeds' spread).")
    return lines


def findings(free: list[dict], order_free: dict[str, float], order_trained: dict[str, float],
             curve: list[tuple[float, float]], summary: dict[str, float], cores: int, images: int) -> list[str]:
    """The papers' claims, each checked against the demo's numbers (every number computed here)."""
    cuts = sorted({r["target_cut"] for r in free if r["method"] in METHODS})
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
        f"{cores} CPU cores). {holds(recovered > 0.5)} (more than half of the loss recovered).")
    for cut in cuts:
        scored = sorted(((top1(free, m, cut), m) for m in METHODS
                         if top1(free, m, cut) is not None), reverse=True)
        mtr, evit = top1(free, "mtr", cut), top1(free, "evit", cut)
        if mtr is None or evit is None:
            continue
        ranking = ", ".join(f"{m} {a:.1f}" for a, m in scored)
        lines.append(f"- **MTR vs EViT and the others at −{cut:.0%} FLOPs, training-free** (MTR Table 1): "
                     f"{ranking}. MTR ahead of EViT {holds(mtr > evit)}; MTR best of all "
                     f"{holds(scored[0][1] == 'mtr')}.")
    lines.append(f"- What is noise here: on {images} validation images one image is {100 / images:.2f} points, and a "
                 f"95 % binomial interval around 80 % top-1 is ±{noise_points(80, images):.1f} points (±"
                 f"{noise_points(95, images):.1f} around 95 %): differences smaller than that are not findings.")
    return lines


def main() -> None:
    torch.manual_seed(0)
    DOCS.mkdir(exist_ok=True)
    free = load_rows(DEMO / "training_free" / "results.json")
    random_rows = load_rows(DEMO / "training_free" / "random_baseline.json")
    retrained = load_rows(DEMO / "retrained" / "results.json")
    base = load_base(ROOT)
    dm = val_data(base, ROOT)
    loaders, num_classes = dm.val_dataloader, dm.num_classes
    exported = rmeeto.export.load(DEMO / "run" / "export")
    r, blocks = exported.token_reducer.schedule.r[0], exported.token_reducer.schedule.blocks
    torch.set_grad_enabled(False)
    base_acc = accuracy(base, loaders(), num_classes, desc="unreduced")
    base_top1, images = base_acc["top1"], base_acc["samples"]
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
    methods = [m for m in METHODS if any(r["method"] == m for r in free)]
    ordered_curve = curves["R-MeeTo ordered"]
    page = [
        "# Results", "",
        "Produced by `scripts/results.py` after `make demo` and `make bench`, on this machine "
        f"({machine_line()}).",
        "Demo numbers come from the digits demo (a tiny Vim, 64×64 images, 65 tokens, 360 validation images).",
        "ImageNet numbers need the public weights and ImageNet, which this run did not have: no ImageNet accuracy",
        "is claimed here.", "",
        "## Do the papers' findings hold on the demo?", "",
        *findings(free, order_free, order_trained, ordered_curve, summary, os.cpu_count(), images),
        *random_findings(random_rows, images, "digits demo"), "",
        "Choices where the papers are silent or where we follow one paper's rule (each is an option):",
        "MTR merges a source into a target by the plain mean of the token vectors, as its paper says",
        "(`op=\"wavg\"` weights by token size instead); MTR and the baselines it is compared with (EViT, PuMer,",
        "UTR, HSA, random) put cls back after exactly the survivors that preceded it (MTR's reordering by",
        "original position), while R-MeeTo keeps its authors' `int(p·(N−r)/N)`; random dropping draws anew for",
        "every image from one seeded generator; MTR's hybrid merges the more important half of the sources and",
        "prunes the rest; the L1/L2 distance ablations compare L2-normalised vectors, as the authors' code does.",
        "",
        *clutter_section(), "",
        "ViT/DeiT: merging inside every block as the authors ran their order study: [order_study.md](order_study.md).",
        "",
        "## FLOPs beside the papers' tables", "", *flops_table(), "",
        "## The demo run (make demo)", "", (DEMO / "summary.md").read_text().strip(), "",
        "## Training-free: methods at equal FLOPs (demo checkpoint, top-1 %)", "",
        *method_table(free, methods), "", "![accuracy vs GFLOPs](results_training_free.png)", "",
        "Random dropping over seeds (mean ± std), at equal FLOPs and at MTR's token count:", "",
        format_random_rows([RandomRow(**r) for r in random_rows]), "",
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
        "Vim against timm's DeiT, inference and training (`benchmarks/bench_cpu.py`; before/after and the limits:",
        "[cpu_speed.md](cpu_speed.md)):", "", "```", bench_text("bench_cpu.txt"), "```",
    ]
    (DOCS / "results.md").write_text("\n".join(page) + "\n")
    print(f"wrote {DOCS / 'results.md'}")


def clutter_section() -> list[str]:
    """The training-free comparison on the cluttered digits (checkpoints/vim_clutter): one digit at a random
    place among noise and fragments, so most tokens are background and which ones a reducer drops matters."""
    from rmeeto.data.clutter import ensure_clutter_shards
    from rmeeto.viz import plot_accuracy_vs_flops

    model = rmeeto.export.load(ROOT / "checkpoints" / "vim_clutter")
    dm = eval_datamodule(ensure_clutter_shards(ROOT / "data" / "clutter"), model, batch_size=120, workers=1,
                         normalisation=model_normalisation(model))
    methods = ["mtr", "evit", "rmeeto", "random"]
    rows = rows_as_dicts(evaluate_configs(model, dm.val_dataloader, dm.num_classes, plan_configs(model, methods, CUTS)))
    random_rows = as_dicts(random_baseline(model, dm.val_dataloader, dm.num_classes, CUTS))
    (DEMO / "clutter").mkdir(parents=True, exist_ok=True)
    (DEMO / "clutter" / "results.json").write_text(json.dumps({"rows": rows, "random": random_rows}, indent=2))
    plot_accuracy_vs_flops(rows, DOCS / "results_clutter.png", title="cluttered digits, training-free")
    images = dm.val_num_samples
    return [
        "## A setting where the choice of tokens matters: cluttered digits", "",
        "A demo digit is 8×8 pixels upscaled, so one token is about one pixel of it and which tokens a reducer",
        "keeps matters less; random dropping keeps up with MTR there. ImageNet photos are mostly",
        "background. `rmeeto.data.clutter` puts one 32×32 digit at a random place on a 64×64 canvas with noise and",
        "fragments of other digits (39–48 of the 64 tokens are background); the same tiny Vim trained on it",
        f"(`checkpoints/vim_clutter`, {rows[0]['top1']:.1f} % on {images} validation images) is reduced here",
        "without training (top-1 %):", "",
        *method_table(rows, methods), "", "![cluttered digits: accuracy vs GFLOPs](results_clutter.png)", "",
        format_random_rows([RandomRow(**r) for r in random_rows]), "",
        *random_findings(random_rows, images, "cluttered digits"),
    ]


def bench_text(name: str) -> str:
    """A benchmark's saved output (`make bench` writes outputs/demo/bench_*.txt), profiler chatter removed."""
    path = DEMO / name
    if not path.is_file():
        return f"(missing: run `make bench` to write {path.relative_to(ROOT)})"
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith(("USDT:", "ERROR:", "WARNING:"))).strip()


if __name__ == "__main__":
    main()
