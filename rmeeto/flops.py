"""Analytic FLOPs of a (token-reduced) Vim in the papers' convention.

The convention counts multiply-adds per image and the Mamba mixer **once**, i.e. one scan
direction, although Vim runs two; this is how R-MeeTo and MTR report 1.45 / 5.08 / 18.87 GFLOPs for
Vim-Ti/S/B. Matching costs of the reducers are added at each reduction point.
"""

from __future__ import annotations

import math

from rmeeto.models.vim import VimConfig, VisionMamba


def mixer_flops(n: int, c: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> float:
    """One Mamba mixer on ``n`` tokens (cls included), one direction: projections, conv, scan."""
    d = expand * c
    dt_rank = math.ceil(c / 16)
    return (
        n * c * 2 * d  # in_proj (C → 2D)
        + n * d * c  # out_proj
        + (n + d_conv - 1) * d * d_conv  # causal conv
        + n * d * (dt_rank + 2 * d_state)  # x_proj
        + n * dt_rank * d  # dt_proj
        + 9 * n * d * d_state + 2 * n * d  # selective scan, D skip, z gate
    )


def count_config(cfg: VimConfig, method=None, schedule=None) -> float:
    """GFLOPs of a Vim with config ``cfg``, reduced by ``method`` on ``schedule`` when given."""
    n0 = cfg.num_patches + 1
    c = cfg.embed_dim
    total = n0 * c * cfg.patch_size**2 * cfg.in_chans + c * max(cfg.num_classes, 0)
    if schedule is None:
        counts = [(n0, 0)] * cfg.depth
    else:
        counts = schedule.token_counts(method, n0, cfg.depth)
    n_prev = n0
    for n, removed in counts:
        if removed:
            total += method.overhead(n_prev, removed, c)
        total += mixer_flops(n, c, cfg.d_state, cfg.d_conv, cfg.expand)
        n_prev = n
    return total / 1e9


def count(model: VisionMamba, img_size: int | None = None) -> float:
    """GFLOPs per image of ``model`` with its current token reduction (one scan direction counted).

    ``img_size`` overrides the model's input size (default: the size it was built for).
    """
    cfg = model.cfg
    if img_size is not None and img_size != cfg.img_size:
        import dataclasses

        cfg = dataclasses.replace(cfg, img_size=img_size)
    reducer = model.token_reducer
    if reducer is None:
        return count_config(cfg)
    return count_config(cfg, reducer.method, reducer.schedule)
