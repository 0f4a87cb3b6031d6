#!/usr/bin/env python
"""Bar chart of Vim's speed relative to timm's DeiT from saved outputs of benchmarks/bench_cpu.py.

    .venv/bin/python scripts/cpu_speed_plot.py OUT.png LABEL=bench_cpu.txt [LABEL=bench_cpu.txt ...]

Each file gives one bar per (size, table, Vim model): the "x DeiT" column (median of per-round ratios).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TITLE = re.compile(r"^(tiny|small|base): (inference, batch \d+|training step)")


def ratios(text: str) -> dict[str, float]:
    """{"small, inference, batch 8, vim_small": 0.37, …} from a bench_cpu.py output."""
    out, table = {}, None
    for line in text.splitlines():
        if m := TITLE.match(line):
            table = f"{m.group(1)}, {m.group(2)}"
        elif table and line.startswith("vim_"):
            cells = re.split(r"\s{2,}", line.strip())
            out[f"{table}, {cells[0]}"] = float(cells[4].split()[0])
    return out


def main() -> None:
    target, *runs = sys.argv[1:]
    series = {label: ratios(Path(path).read_text()) for label, path in (r.split("=", 1) for r in runs)}
    keys = list(next(iter(series.values())))
    fig, ax = plt.subplots(figsize=(10.5, 0.32 * len(keys) + 1.5))
    height = 0.8 / len(series)
    colors = plt.get_cmap("tab20" if len(series) > 10 else "tab10").colors  # past 10 runs tab10 would repeat
    for i, (label, values) in enumerate(series.items()):
        ax.barh([k + i * height for k in range(len(keys))], [values.get(key, 0) for key in keys], height,
                label=label, color=colors[i])
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks([k + 0.4 - height / 2 for k in range(len(keys))], keys, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("images/s relative to timm's DeiT of the same size (1 = as fast)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: with many series it would cover bars
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
