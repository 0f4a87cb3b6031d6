"""Analytic FLOPs of a (token-reduced) Vim, VideoMamba or DeiT/ViT in the papers' convention.

The convention counts multiply-adds per image (per clip for video) and the Mamba mixer **once**, i.e.
one scan direction, although Vim runs two; this is how R-MeeTo and MTR report 1.45 / 5.08 / 18.87 GFLOPs
for Vim-Ti/S/B (and for VideoMamba-Ti/S/B, which has the same shapes), and R-MeeTo 11.54 / 40.43 / 115.33
for VideoMamba-Ti/S/M on 8-frame clips. A ViT block (DeiT through :mod:`rmeeto.models.deit`) costs its
projections, attention and MLP, which gives DeiT's 1.3 / 4.6 / 17.6 GFLOPs for Ti/S/B. Matching costs of
the reducers are added at each reduction point. Other models (no such ``cfg``) raise TypeError.
"""

from __future__ import annotations

import math

from torch import nn

from rmeeto.models.deit import ViTConfig
from rmeeto.models.videomamba import VideoMambaConfig
from rmeeto.models.vim import VimConfig

#: Configs with a FLOPs formula here.
ModelConfig = VimConfig | ViTConfig


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


def vit_block_flops(n: int, c: int, mlp_ratio: float = 4.0, merged: int = 0) -> float:
    """One pre-norm ViT block on ``n`` tokens (cls included): qkv and output projections 4nC², attention
    scores and weighted sum 2n²C, MLP 2·mlp_ratio·nC². With ``merged`` tokens merged inside the block
    (after attention, before the MLP) the MLP runs on n − merged tokens."""
    return 4 * n * c**2 + 2 * n**2 * c + 2 * mlp_ratio * (n - merged) * c**2


def block_flops(cfg: ModelConfig, n: int, merged: int = 0) -> float:
    """One block of the model with config ``cfg`` on ``n`` tokens (cls included); ``merged``: tokens a ViT
    merges inside the block."""
    if isinstance(cfg, ViTConfig):
        return vit_block_flops(n, cfg.embed_dim, cfg.mlp_ratio, merged)
    if merged:
        raise ValueError(f"only ViT blocks merge tokens inside the block, not {type(cfg).__name__}")
    return mixer_flops(n, cfg.embed_dim, cfg.d_state, cfg.d_conv, cfg.expand)


def stem_flops(cfg: ModelConfig) -> float:
    """Patch embedding and head: tokens · C · (tubelet ·) patch² · in_chans + C · num_classes. The Mamba
    papers count the embedding over all num_patches + 1 tokens, cls included; DeiT over the patches only."""
    tokens = cfg.num_patches + (0 if isinstance(cfg, ViTConfig) else 1)
    tubelet = cfg.tubelet_size if isinstance(cfg, VideoMambaConfig) else 1
    patch_volume = cfg.patch_size**2 * cfg.in_chans * tubelet
    return tokens * cfg.embed_dim * patch_volume + cfg.embed_dim * max(cfg.num_classes, 0)


def check_config(cfg: object, what: str) -> ModelConfig:
    """``cfg`` if it has a formula here; TypeError naming ``what`` otherwise."""
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"FLOPs in the papers' convention are defined for Vim, VideoMamba and DeiT/ViT models "
                        f"only, not for {what}")
    return cfg


def count_config(cfg: ModelConfig, method=None, schedule=None) -> float:
    """GFLOPs of a Vim, VideoMamba or ViT with config ``cfg``, reduced by ``method`` on ``schedule`` when given.

    Tokens n0 = num_patches + 1 (for video: patches per frame · frames / tubelet + 1); patch embedding and
    head as in :func:`stem_flops`, each block as in :func:`block_flops`, plus the method's matching cost
    on the tokens present at each reduction point. A schedule with ``inside_blocks`` (ViT merging after
    attention, :mod:`rmeeto.reduction.vit`) lists (tokens entering block i, tokens merged inside it): the
    attention runs on the former, the MLP on the difference.
    """
    check_config(cfg, f"a model with config {type(cfg).__name__}")
    n0 = cfg.num_patches + 1
    counts = [(n0, 0)] * cfg.depth if schedule is None else schedule.token_counts(method, n0, cfg.depth)
    inside = getattr(schedule, "inside_blocks", False)
    total = stem_flops(cfg)
    n_prev = n0
    for n, removed in counts:
        if removed:
            total += method.overhead(n if inside else n_prev, removed, cfg.embed_dim)
        total += block_flops(cfg, n, removed if inside else 0)
        n_prev = n
    return total / 1e9


def count(model: nn.Module, img_size: int | None = None) -> float:
    """GFLOPs per image (per clip) of a Vim, VideoMamba or ViT ``model`` with its current token reduction
    (one scan direction counted); TypeError for other models.

    ``img_size`` overrides the model's input size (default: the size it was built for).
    """
    cfg = check_config(getattr(model, "cfg", None), type(model).__name__)
    if img_size is not None and img_size != cfg.img_size:
        import dataclasses

        cfg = dataclasses.replace(cfg, img_size=img_size)
    reducer = model.token_reducer
    if reducer is None:
        return count_config(cfg)
    return count_config(cfg, reducer.method, reducer.schedule)
