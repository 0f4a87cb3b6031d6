"""Analytic FLOPs of a (token-reduced) Vim or VideoMamba in the papers' convention.

The convention counts multiply-adds per image (per clip for video) and the Mamba mixer **once**, i.e.
one scan direction, although Vim runs two; this is how R-MeeTo and MTR report 1.45 / 5.08 / 18.87 GFLOPs
for Vim-Ti/S/B (and for VideoMamba-Ti/S/B, which has the same shapes), and R-MeeTo 11.54 / 40.43 / 115.33
for VideoMamba-Ti/S/M on 8-frame clips. Matching costs of the reducers are added at each reduction point.
Other model families (e.g. DeiT through :mod:`rmeeto.models.deit`) have no formula here: TypeError.
"""

from __future__ import annotations

import math

from rmeeto.models.videomamba import VideoMambaConfig
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
    """GFLOPs of a Vim or VideoMamba with config ``cfg``, reduced by ``method`` on ``schedule`` when given.

    Tokens n0 = num_patches + 1 (for video: patches per frame · frames / tubelet + 1); the patch
    embedding costs n0 · C · (tubelet ·) patch² · in_chans, the head C · num_classes.
    """
    if not isinstance(cfg, VimConfig):
        raise TypeError(f"FLOPs in the papers' convention are defined for Vim and VideoMamba models only, "
                        f"not for a model with config {type(cfg).__name__}")
    n0 = cfg.num_patches + 1
    c = cfg.embed_dim
    patch_volume = cfg.patch_size**2 * cfg.in_chans
    if isinstance(cfg, VideoMambaConfig):
        patch_volume *= cfg.tubelet_size
    total = n0 * c * patch_volume + c * max(cfg.num_classes, 0)
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
    """GFLOPs per image (per clip) of a Vim or VideoMamba ``model`` with its current token reduction
    (one scan direction counted); TypeError for other models.

    ``img_size`` overrides the model's input size (default: the size it was built for).
    """
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, VimConfig):
        raise TypeError(f"FLOPs in the papers' convention are defined for Vim and VideoMamba models only, "
                        f"not for {type(model).__name__}")
    if img_size is not None and img_size != cfg.img_size:
        import dataclasses

        cfg = dataclasses.replace(cfg, img_size=img_size)
    reducer = model.token_reducer
    if reducer is None:
        return count_config(cfg)
    return count_config(cfg, reducer.method, reducer.schedule)
