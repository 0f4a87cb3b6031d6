"""DeiT / timm ViT with the token-reduction hook, so that ``rmeeto.reduction.apply`` works on it.

:class:`ReducibleViT` runs a timm ``VisionTransformer``'s own modules (patch embedding, cls token and
position embedding, blocks, norm, head) and calls ``token_reducer`` between blocks like Vim does. The cls
token stays first (index 0, so it is reinserted at int(0·(N−r)/N) = 0). Attention blocks carry the
residual inside, so the :class:`~rmeeto.models.vim.TokenState` holds the block output as ``hidden`` and
no residual. Merged tokens enter attention unweighted (no proportional attention). Only hidden-state
methods apply (``rmeeto``, ``prune``, ``tome``, ``shuffle``, ``evit``, ``mtr`` with ``indicator="cls"``).
``cfg`` (:class:`ViTConfig`) holds what :mod:`rmeeto.flops` needs to count DeiT FLOPs in the papers' convention.

    model = create_deit("deit_tiny_patch16_224", pretrained="deit_tiny_patch16_224-a1311bcf.pth")
    rmeeto.reduction.apply(model, "rmeeto", r=11)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from rmeeto.models.checkpoint import load_checkpoint
from rmeeto.models.vim import TokenReducer, TokenState


@dataclass(frozen=True)
class ViTConfig:
    """Shape of a wrapped ViT, as the reduction plug-in and :mod:`rmeeto.flops` read it (square input)."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    mlp_ratio: float
    num_classes: int
    in_chans: int = 3

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @classmethod
    def of(cls, vit: VisionTransformer) -> ViTConfig:
        """The config of a timm ``VisionTransformer`` with square images and patches."""
        embed = vit.patch_embed
        (height, width), (patch_h, patch_w) = embed.img_size, embed.patch_size
        if height != width or patch_h != patch_w:
            raise ValueError(f"{type(vit).__name__}: needs square images and patches; got img_size "
                             f"{embed.img_size}, patch_size {embed.patch_size}")
        return cls(img_size=height, patch_size=patch_h, embed_dim=vit.embed_dim, depth=len(vit.blocks),
                   mlp_ratio=vit.blocks[0].mlp.fc1.out_features / vit.embed_dim, num_classes=vit.num_classes,
                   in_chans=embed.proj.in_channels)


class ReducibleViT(nn.Module):
    """timm ViT with a cls token, class-token pooling and no other prefix tokens: B×3×H×W → B×num_classes.

    The wrapped model is ``vit`` (its state-dict keys gain the prefix ``vit.``); ``layers`` is its blocks.
    """

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"ReducibleViT wraps a timm VisionTransformer, not a {type(vit).__name__}")
        if not (vit.has_class_token and vit.num_prefix_tokens == 1 and vit.global_pool == "token"):
            raise ValueError(f"{type(vit).__name__}: needs exactly one prefix token (cls) and cls pooling; got "
                             f"{vit.num_prefix_tokens} prefix token(s), global_pool={vit.global_pool!r}")
        self.vit = vit
        self.cfg = ViTConfig.of(vit)
        self.num_classes = vit.num_classes
        self.token_reducer: TokenReducer | None = None

    @property
    def layers(self) -> nn.Sequential:
        return self.vit.blocks

    def forward_features(self, x: Tensor) -> Tensor:
        """B×3×H×W → B×N×C normed tokens (N after reduction), cls at index 0."""
        vit = self.vit
        state = TokenState(hidden=vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))),
                           residual=None, cls_index=0)
        for i, block in enumerate(vit.blocks):
            if i > 0 and self.token_reducer is not None:
                state = self.token_reducer(i, state)
            state.hidden = block(state.hidden)
        return vit.norm(state.hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.vit.forward_head(self.forward_features(x))


def create_deit(name: str = "deit_tiny_patch16_224", pretrained: str | Path | None = None,
                **timm_kwargs: Any) -> ReducibleViT:
    """``timm.create_model(name, pretrained=False, **timm_kwargs)`` wrapped in :class:`ReducibleViT`.

    ``pretrained``: a timm/DeiT state dict file (bare, or under ``"model"`` as the DeiT releases nest it),
    loaded into ``model.vit`` with strict key and shape checks (:class:`~rmeeto.models.CheckpointError`).
    """
    model = ReducibleViT(timm.create_model(name, pretrained=False, **timm_kwargs))
    if pretrained:
        load_checkpoint(model.vit, pretrained)
    return model
