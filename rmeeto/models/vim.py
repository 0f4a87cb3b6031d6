"""Vision Mamba (Vim): middle cls token, absolute position embedding, bidirectional Mamba blocks.

The forward pass has exactly one place where token reduction may act: between blocks, a
``token_reducer`` callable receives and returns a :class:`TokenState`. Nothing else here knows
about reduction (see :mod:`rmeeto.reduction`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.layers import DropPath, trunc_normal_
from torch import Tensor, nn

from rmeeto.models import frozen_forward
from rmeeto.models.mamba import BiMamba, FrozenBlock, RMSNorm, calls_hooks
from rmeeto.ops.workspace import hold


@dataclass
class TokenState:
    """What flows between blocks.

    hidden: B×N×C mixer output of the previous block. residual: B×N×C fp32 residual stream (None
    before block 0). cls_index: B long, position of each image's cls token (an int is taken as the same
    position for every image). size: B×N token sizes (None = all 1). source: B×N×M map of how many of
    the M original tokens each token holds (None = not tracked).
    """

    hidden: Tensor
    residual: Tensor | None
    cls_index: Tensor
    size: Tensor | None = None
    source: Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.cls_index, int):
            self.cls_index = torch.full((self.hidden.shape[0],), self.cls_index, device=self.hidden.device)

    def cls_rows(self, x: Tensor) -> Tensor:
        """B×N×C → B×C: each image's cls token."""
        return x[torch.arange(x.shape[0], device=x.device), self.cls_index]


TokenReducer = Callable[[int, TokenState], TokenState]


@dataclass(frozen=True)
class VimConfig:
    """Architecture of a Vim; the defaults are Vim-S at 224×224. ``divide_out``: the mixer averages its
    two scan directions (Vim); False sums them (VideoMamba). ``patch_stride``: 8 for the fine-tuned "Vim+"
    checkpoints (overlapping 16×16 patches, 729 + 1 tokens at 224); None = ``patch_size``."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 24
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-5
    divide_out: bool = True
    patch_stride: int | None = None

    def __post_init__(self) -> None:
        if (self.img_size - self.patch_size) % self.stride:
            raise ValueError(f"img_size={self.img_size} does not fit patches of {self.patch_size} at stride "
                             f"{self.stride}: the border pixels would be ignored")

    @property
    def stride(self) -> int:
        """Patch stride: ``patch_stride``, or the patch size (non-overlapping patches, the default)."""
        return self.patch_stride or self.patch_size

    @property
    def num_patches(self) -> int:
        return ((self.img_size - self.patch_size) // self.stride + 1) ** 2


def check_patch_multiple(x: Tensor, patch_size: int, stride: int | None = None) -> None:
    """ValueError unless patches of ``patch_size`` at ``stride`` (default: the patch size) tile the input's
    height and width (its last two dims) exactly."""
    stride = stride or patch_size
    if (x.shape[-1] - patch_size) % stride or (x.shape[-2] - patch_size) % stride:
        raise ValueError(f"image size {tuple(x.shape[-2:])} does not fit patches of {patch_size} at stride "
                         f"{stride}: the border pixels would be ignored")


class PatchEmbed(nn.Module):
    """B×3×H×W → B×M×C with a strided convolution."""

    def __init__(self, cfg: VimConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, stride=cfg.stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
    """``residual += drop_path(hidden)``; ``hidden = mixer(norm(residual))``; residual kept in fp32."""

    def __init__(self, cfg: VimConfig, drop_path: float):
        super().__init__()
        self.norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mixer = BiMamba(cfg.embed_dim, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                             divide_out=cfg.divide_out)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        hidden = hidden if residual is None else self.drop_path(hidden)
        if type(self.mixer) is BiMamba and type(self.norm) is RMSNorm:  # not a subclass: its forward may differ
            fused = self.mixer.block_forward(self.norm, hidden, residual)
            if fused is not None:
                return fused
        normed, residual = self.norm.add_forward(hidden, residual)
        return self.mixer(normed), residual


def _frozen_run(layer: nn.Module) -> FrozenBlock | None:
    """What ``layer(hidden, residual)`` computes as its mixer's frozen_block (BiMamba.frozen_block: inside
    rmeeto.frozen), or None: where the layer is not a plain Block (a subclass's forward may differ), would run a
    hook of its own or a global one, or its drop path would drop (a DropPath in training)."""
    if type(layer) is not Block:
        return None
    modules = layer._modules  # not by attribute: nn.Module.__getattr__ is a Python function, asked 24 times a forward
    mixer, norm, drop = modules["mixer"], modules["norm"], modules["drop_path"]
    if type(mixer) is not BiMamba or type(norm) is not RMSNorm or mixer._prepared is None or calls_hooks(layer):
        return None  # not frozen (checked before the hooks): the usual call
    if not (type(drop) is nn.Identity or (type(drop) is DropPath and not drop.training)) or calls_hooks(drop):
        return None
    return mixer.frozen_block(norm)


class VisionMamba(nn.Module):
    """Vim classifier: B×3×H×W → B×num_classes (or B×C features with ``forward_features``)."""

    def __init__(self, cfg: VimConfig = VimConfig()):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.embed_dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.embed_dim))
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.layers = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.norm_f = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.drop_path = DropPath(cfg.drop_path_rate) if cfg.drop_path_rate > 0 else nn.Identity()
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.token_reducer: TokenReducer | None = None
        self._init_weights()

    def _init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:  # GPT-2 style rescale of the residual branch output
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=5**0.5)
            with torch.no_grad():
                layer.mixer.out_proj.weight /= len(self.layers) ** 0.5

    def embed(self, x: Tensor) -> TokenState:
        """Patchify, insert cls at the middle (index M // 2), add position embedding."""
        check_patch_multiple(x, self.cfg.patch_size, self.cfg.stride)
        tokens = self.patch_embed(x)
        m = tokens.shape[1]
        if m + 1 != self.pos_embed.shape[1]:
            raise ValueError(
                f"input gives {m} patches but the model was built for {self.pos_embed.shape[1] - 1} "
                f"(img_size={self.cfg.img_size}, patch_size={self.cfg.patch_size}); got image {tuple(x.shape[-2:])}"
            )
        p = m // 2
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([tokens[:, :p], cls, tokens[:, p:]], dim=1) + self.pos_embed
        return TokenState(hidden=tokens, residual=None, cls_index=p)

    def forward_blocks(self, state: TokenState) -> TokenState:
        """Run all blocks; the token reducer (if any) acts before each block except the first, as its ``for_forward``
        gives it where it has one (TokenReduction: checks that hold for the whole forward made once). The mixers that
        record no gradients put their temporaries in one workspace held across the blocks
        (rmeeto.ops.workspace). Inside rmeeto.frozen each block runs as its mixer's frozen_block, checked for all
        blocks before the first runs; where every block does, and the reducer (if any) makes only merges a kernel can
        make as it goes (its ``blocks_kernel_merges``), all blocks and merges run as one kernel call
        (rmeeto.models.frozen_forward)."""
        reducer = reduce = self.token_reducer
        if reduce is not None and hasattr(reduce, "for_forward"):  # checks for the whole forward made once
            reduce = reduce.for_forward(state.hidden)
        with hold():
            runs = [_frozen_run(layer) for layer in self.layers]
            if frozen_forward.applies(runs, state):  # then all blocks and merges as one kernel call, if it can merge
                merges_for = getattr(reducer, "blocks_kernel_merges", lambda like: None)
                merges = {} if reducer is None else merges_for(state.hidden)
                out = None if merges is None else frozen_forward.run_blocks(runs, state, merges, reduce)
                if out is not None:
                    return out
            for i, (layer, run) in enumerate(zip(self.layers, runs, strict=True)):
                if i > 0 and reduce is not None:
                    state = reduce(i, state)
                out = None if run is None else run(state.hidden, state.residual)
                state.hidden, state.residual = layer(state.hidden, state.residual) if out is None else out
        return state

    def forward_features(self, x: Tensor) -> Tensor:
        """B×3×H×W → B×C: the normed cls token at its current position."""
        state = self.forward_blocks(self.embed(x))
        hidden, _ = self.norm_f.add_forward(self.drop_path(state.hidden), state.residual)
        return state.cls_rows(hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))

    def no_weight_decay(self) -> set[str]:
        """Parameter names excluded from weight decay (besides norms and biases)."""
        return {"pos_embed", "cls_token"}
