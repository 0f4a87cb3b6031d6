"""DeiT / timm ViT with the token-reduction hook, so that ``rmeeto.reduction.apply`` works on it.

:class:`ReducibleViT` runs a timm ``VisionTransformer``'s own modules (patch embedding, cls token and
position embedding, blocks, norm, head) and calls its ``token_reducer`` at one site per block, as a
:class:`~rmeeto.models.vim.TokenState` → TokenState callable:

- by default **between** blocks, before block i (i ≥ 1), like Vim;
- **inside** block i, after the attention branch has been added to the stream and before the MLP, when
  the reducer says ``inside_blocks = True`` (ToMe's placement, which R-MeeTo's authors use on DeiT).

The cls token stays first (index 0). Attention blocks carry the residual inside, so the state holds the
stream as ``hidden`` and no residual. Nothing here knows about merging: what a reducer needs beyond the
state (token sizes in the attention, the attention's q/k/v) it gets through module hooks it installs
itself (:mod:`rmeeto.reduction.vit`). ``cfg`` (:class:`ViTConfig`) holds what :mod:`rmeeto.flops` needs
to count DeiT FLOPs in the papers' convention.

    model = create_deit("deit_tiny_patch16_224", pretrained="deit_tiny_patch16_224-a1311bcf.pth")
    rmeeto.reduction.apply(model, "rmeeto", r=5)          # every block, after attention (the authors')

``deit_demo`` (a tiny DeiT for the digits demo) is registered with :mod:`rmeeto.models.registry`, so
``rmeeto.create_model("deit_demo")``, training and :mod:`rmeeto.export` handle it like a Vim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from rmeeto.models import registry
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


@dataclass(frozen=True)
class DeiTConfig(ViTConfig):
    """A DeiT fully described by its fields (timm ``VisionTransformer`` defaults otherwise: qkv bias, learned
    position embedding over cls + patches, LayerNorm eps 1e-6), so that the registry and :mod:`rmeeto.export`
    can rebuild it. The defaults are the demo DeiT."""

    img_size: int = 64
    patch_size: int = 8
    embed_dim: int = 64
    depth: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 10
    num_heads: int = 2
    drop_path_rate: float = 0.0

    def build(self) -> VisionTransformer:
        return VisionTransformer(img_size=self.img_size, patch_size=self.patch_size, in_chans=self.in_chans,
                                 num_classes=self.num_classes, embed_dim=self.embed_dim, depth=self.depth,
                                 num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                                 drop_path_rate=self.drop_path_rate)


class ReducibleViT(nn.Module):
    """timm ViT with a cls token, class-token pooling, no other prefix tokens and plain pre-norm blocks:
    B×3×H×W → B×num_classes.

    Built from a timm ``VisionTransformer`` or a :class:`DeiTConfig`. The wrapped model is ``vit`` (its
    state-dict keys gain the prefix ``vit.``); ``layers`` is its blocks.
    """

    def __init__(self, vit: VisionTransformer | DeiTConfig):
        super().__init__()
        cfg = vit if isinstance(vit, DeiTConfig) else None
        if cfg is not None:
            vit = cfg.build()
        if not isinstance(vit, VisionTransformer):
            raise TypeError(f"ReducibleViT wraps a timm VisionTransformer, not a {type(vit).__name__}")
        if not (vit.has_class_token and vit.num_prefix_tokens == 1 and vit.global_pool == "token"):
            raise ValueError(f"{type(vit).__name__}: needs exactly one prefix token (cls) and cls pooling; got "
                             f"{vit.num_prefix_tokens} prefix token(s), global_pool={vit.global_pool!r}")
        odd = [type(b).__name__ for b in vit.blocks if type(b) is not Block]
        if odd:
            raise ValueError(f"{type(vit).__name__}: needs timm's pre-norm Block in every layer, found {odd[0]}")
        self.vit = vit
        self.cfg = cfg or ViTConfig.of(vit)
        self.num_classes = vit.num_classes
        self.token_reducer: TokenReducer | None = None

    @property
    def layers(self) -> nn.Sequential:
        return self.vit.blocks

    def forward_features(self, x: Tensor) -> Tensor:
        """B×3×H×W → B×N×C normed tokens (N after reduction), cls at index 0.

        Each block is timm's ``Block.forward`` written out in its two residual branches, so that the
        reducer can be called between them."""
        vit, reducer = self.vit, self.token_reducer
        inside = bool(getattr(reducer, "inside_blocks", False))
        state = TokenState(hidden=vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))),
                           residual=None, cls_index=0)
        for i, block in enumerate(vit.blocks):
            if reducer is not None and not inside and i > 0:
                state = reducer(i, state)
            state.hidden = state.hidden + block.drop_path1(block.ls1(block.attn(block.norm1(state.hidden))))
            if reducer is not None and inside:
                state = reducer(i, state)
            state.hidden = state.hidden + block.drop_path2(block.ls2(block.mlp(block.norm2(state.hidden))))
        return vit.norm(state.hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.vit.forward_head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (besides norms and biases), as timm's ViT lists them."""
        return {f"vit.{name}" for name in self.vit.no_weight_decay()}


def create_deit(name: str = "deit_tiny_patch16_224", pretrained: bool | str | Path | None = None,
                **timm_kwargs: Any) -> ReducibleViT:
    """``timm.create_model(name, **timm_kwargs)`` wrapped in :class:`ReducibleViT`.

    ``pretrained``: True downloads the weights of timm's own pretrained config for ``name`` (the Hugging Face
    Hub, e.g. ``timm/deit_small_patch16_224.fb_in1k``); a path is a timm/DeiT state dict file (bare, or under
    ``"model"`` as the DeiT releases nest it) or an ``hf-hub:`` reference, loaded into ``model.vit`` with
    strict key and shape checks (:class:`~rmeeto.models.CheckpointError`).
    """
    model = ReducibleViT(timm.create_model(name, pretrained=pretrained is True, **timm_kwargs))
    if pretrained and pretrained is not True:
        load_checkpoint(model.vit, pretrained)
    return model


#: The demo DeiT (64×64 digits, patch 8 → 64 tokens + cls, depth 6, width 64, 2 heads, 10 classes).
VARIANTS = {"deit_demo": DeiTConfig()}

registry.register_family(VARIANTS, ReducibleViT)
