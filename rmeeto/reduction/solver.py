"""Pick the reduction amount that gives a requested FLOPs cut, for any method and schedule."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from rmeeto.flops import ModelConfig, count_config
from rmeeto.reduction.methods import Method
from rmeeto.reduction.reducer import Schedule


def solve_amount(cfg: ModelConfig, method: Method, schedule_for: Callable[[float], Schedule],
                 flops_cut: float) -> float:
    """The amount (r tokens or ratio) whose FLOPs cut, 1 − GFLOPs/GFLOPs₀, is closest to ``flops_cut``.

    ``schedule_for(amount)`` builds the schedule; amounts the schedule cannot carry are skipped.
    """
    if not 0 < flops_cut < 1:
        raise ValueError(f"flops_cut must be in (0, 1), got {flops_cut}")
    base = count_config(cfg)
    grid = range(0, cfg.num_patches + 1) if method.amount_kind == "count" else np.arange(0, 0.5, 0.0025)
    best, best_err = None, float("inf")
    for amount in grid:
        amount = float(amount) if method.amount_kind == "ratio" else int(amount)
        try:
            cut = 1 - count_config(cfg, method, schedule_for(amount)) / base
        except ValueError:  # this amount removes more tokens than the schedule has
            break
        if abs(cut - flops_cut) < best_err:
            best, best_err = amount, abs(cut - flops_cut)
    if best is None or best_err > 0.05:
        raise ValueError(f"no amount of {type(method).__name__} reaches a {flops_cut:.0%} FLOPs cut "
                         f"on this schedule (closest: {best})")
    return best
