"""Token reduction for any classifier built from mamba-ssm-style blocks: the adapter and its contract.

:func:`rmeeto.reduction.apply` works on any module that offers

- ``layers``: the blocks, in order; the reducer acts *before* block i (i ≥ 1) of the schedule;
- ``cfg.num_patches``: the number of tokens entering block 0, cls excluded (to check schedules);
- ``token_reducer``: an attribute the forward pass calls as ``state = token_reducer(i, state)`` with a
  :class:`~rmeeto.models.vim.TokenState` before every block i ≥ 1, then continues with ``state.hidden``,
  ``state.residual`` and ``state.cls_index`` (tokens may have been merged away and cls moved).

:class:`MambaBlocks` provides all three around a user's embedding, blocks, final norm and head. The blocks
must follow mamba-ssm's ``Block`` convention, ``hidden, residual = block(hidden, residual)`` with
``residual = None`` at block 0 (pre-norm Add → Norm → Mixer; mamba-ssm's ``Block`` and
:class:`rmeeto.models.vim.Block` do), and the embedding must return B×N×C tokens with a cls token at
``cls_index``; the classifier reads cls at its current position after ``norm(residual + hidden)``.

Methods that rank or match tokens by the hidden state (``rmeeto``, ``prune``, ``tome``, ``evit``,
``mtr`` with ``indicator="cls"``) need nothing more. Methods that use the SSM's Δ, B or C (``mtr`` by
default) read them from ``layers[i - 1].mixer`` before reduction point i, which must then have

- ``record: bool``: set by the reducer; while True, each forward stores
- ``last_record``: a :class:`~rmeeto.models.mamba.ScanRecord` (or None before the first call) whose
  ``delta`` is a pair of B×Dᵢ×L timescales *after* bias and softplus, in sequence order (a backward scan's
  flipped back; a one-directional mixer gives the same tensor twice), and ``B``/``C`` pairs of B×N×L.

:class:`rmeeto.models.mamba.BiMamba` implements this; mamba-ssm's ``Mamba`` does not (its fused kernel
never materialises Δ), so wrap or subclass it, or use a hidden-state method. Without a recording mixer,
attaching a Δ-based method raises a ValueError naming the layer. FLOPs (:mod:`rmeeto.flops`) are only
defined for Vim, VideoMamba and DeiT/ViT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

from rmeeto.models.vim import TokenReducer, TokenState, VisionMamba


class ReducibleConfig(Protocol):
    num_patches: int


class Reducible(Protocol):
    """The contract above, as a type: what :func:`rmeeto.reduction.apply` needs from a model."""

    layers: nn.ModuleList | nn.Sequential
    cfg: ReducibleConfig
    token_reducer: TokenReducer | None


@dataclass(frozen=True)
class AdapterConfig:
    """What the reduction plug-in reads from an adapted model's ``cfg``: tokens entering block 0, cls
    excluded (``num_patches``), and the embed dim."""

    num_patches: int
    embed_dim: int


class MambaBlocks(nn.Module):
    """Classifier from a user's parts: ``embed`` (input → B×N×C tokens, cls at ``cls_index``), ``blocks``
    (mamba-ssm-style, see the module docstring), ``norm`` (final norm of residual + hidden) and ``head``
    (B×C cls features → B×K logits). ``num_tokens``: N, cls included, that ``embed`` produces."""

    def __init__(self, embed: nn.Module, blocks: nn.ModuleList, norm: nn.Module, head: nn.Module,
                 num_tokens: int, embed_dim: int, cls_index: int = 0):
        super().__init__()
        if not 0 <= cls_index < num_tokens:
            raise ValueError(f"cls_index={cls_index} outside the {num_tokens} tokens")
        self.cfg = AdapterConfig(num_patches=num_tokens - 1, embed_dim=embed_dim)
        self.cls_index = cls_index
        self.embed_tokens, self.layers, self.norm_f, self.head = embed, blocks, norm, head
        self.token_reducer: TokenReducer | None = None

    #: The same loop as Vim's: blocks with the reducer before each one but the first.
    forward_blocks = VisionMamba.forward_blocks

    def embed(self, x: Tensor) -> TokenState:
        tokens = self.embed_tokens(x)
        if tokens.shape[1] != self.cfg.num_patches + 1:
            raise ValueError(f"the embedding gave {tokens.shape[1]} tokens, the adapter was built for "
                             f"{self.cfg.num_patches + 1}")
        return TokenState(hidden=tokens, residual=None, cls_index=self.cls_index)

    def forward_features(self, x: Tensor) -> Tensor:
        """Input → B×C: the normed cls token at its current position."""
        state = self.forward_blocks(self.embed(x))
        return state.cls_rows(self.norm_f(state.residual + state.hidden))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))
