"""DeiT / timm ViT with the token-reduction hook, so that ``rmeeto.reduction.apply`` works on it.

:class:`ReducibleViT` runs a timm ``VisionTransformer``'s own modules (patch embedding, cls token and
position embedding, blocks, norm, head) and calls ``token_reducer`` between blocks like Vim does. The cls
token stays first (index 0, so it is reinserted at int(0·(N−r)/N) = 0). Attention blocks carry the
residual inside, so the :class:`~rmeeto.models.vim.TokenState` holds the block output as ``hidden`` and
no residual. Merged tokens enter attention unweighted (no proportional attention). Only hidden-state
methods apply (``rmeeto``, ``prune``, ``tome``, ``shuffle``, ``evit``, ``mtr`` with ``indicator="cls"``),
and there is no FLOPs formula in the papers' convention for DeiT.

    model = create_deit("deit_tiny_patch16_224")      # timm weights: load into model.vit as usual
    rmeeto.reduction.apply(model, "rmeeto", r=11)
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from rmeeto.models.generic import AdapterConfig
from rmeeto.models.vim import TokenReducer, TokenState


class ReducibleViT(nn.Module):
    """timm ViT with a cls token, class-token pooling and no other prefix tokens: B×3×H×W → B×num_classes.

    The wrapped model is ``vit`` (its state-dict keys gain the prefix ``vit.``); ``layers`` is its blocks.
    """

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        if not (vit.has_class_token and vit.num_prefix_tokens == 1 and vit.global_pool == "token"):
            raise ValueError(f"{type(vit).__name__}: needs exactly one prefix token (cls) and cls pooling; got "
                             f"{vit.num_prefix_tokens} prefix token(s), global_pool={vit.global_pool!r}")
        self.vit = vit
        self.cfg = AdapterConfig(num_patches=vit.patch_embed.num_patches, embed_dim=vit.embed_dim)
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


def create_deit(name: str = "deit_tiny_patch16_224", **timm_kwargs: Any) -> ReducibleViT:
    """``timm.create_model(name, pretrained=False, **timm_kwargs)`` wrapped in :class:`ReducibleViT`."""
    return ReducibleViT(timm.create_model(name, pretrained=False, **timm_kwargs))
