"""Pick the per-point setting r that gives a requested FLOPs cut, for any method and schedule."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rmeeto.flops import ModelConfig, count_config
from rmeeto.reduction.methods import Method
from rmeeto.reduction.reducer import Schedule


def solve_r(cfg: ModelConfig, method: Method, schedule_for: Callable[[float], Schedule], flops_cut: float) -> float:
    """The r (tokens or ratio) whose FLOPs cut, 1 − GFLOPs/GFLOPs₀, is closest to ``flops_cut``.

    ``schedule_for(r)`` builds the schedule; values the schedule cannot carry end the search.
    """
    if not 0 < flops_cut < 1:
        raise ValueError(f"flops_cut must be in (0, 1), got {flops_cut}")
    base = count_config(cfg)
    grid = range(0, cfg.num_patches + 1) if method.r_kind == "count" else np.arange(0, 0.5, 0.0025)
    best, best_err = None, float("inf")
    for r in grid:
        r = float(r) if method.r_kind == "ratio" else int(r)
        try:
            cut = 1 - count_config(cfg, method, schedule_for(r)) / base
        except ValueError:  # this r removes more tokens than the schedule has
            break
        if abs(cut - flops_cut) < best_err:
            best, best_err = r, abs(cut - flops_cut)
    if best is None or best_err > 0.05:
        raise ValueError(f"no r of {type(method).__name__} reaches a {flops_cut:.0%} FLOPs cut "
                         f"on this schedule (closest: {best})")
    return best


def largest_r(method: Method, schedule_for: Callable[[float], Schedule], n0: int, below: int) -> int | None:
    """The largest token count r < ``below`` that ``schedule_for(r)`` can carry from ``n0`` tokens (None: none)."""
    for r in range(below - 1, -1, -1):
        try:
            schedule_for(r).removed(method, n0)
        except ValueError:
            continue
        return r
    return None
