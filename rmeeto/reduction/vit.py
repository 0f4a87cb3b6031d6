"""Token merging inside ViT/DeiT blocks, as R-MeeTo's authors ran their order study (methods.md §5).

ToMe's placement: in every block, after the attention branch has been added to the stream and before the
MLP. The metric is that stream (``x``), or the attention's q, k or v averaged over heads. Matching runs
over **all** N tokens: A = even positions (cls, at index 0, included but never a source: score −∞),
B = odd positions; the r A tokens with the best match join their B partner (size-weighted average, sizes
add) or, for ``prune``, are dropped. r is capped at (N − 1) // 2, the number of A tokens besides cls.
Layouts: ``ordered`` (survivors by position, cls first), ``unordered`` (ToMe's: unmerged A tokens by
position, cls first, then the B tokens), ``odd_even`` (the ordered survivors after cls odd-even shuffled).
Attention is proportional: log(size) of each key token is added to the attention logits.

The model calls the reducer once per block (``inside_blocks = True``); the reducer installs, when
attached, the two module hooks it needs: a forward pre-hook on each ``block.attn`` that passes the
log-size bias as timm's ``attn_mask``, and (metric q/k/v) a forward hook on ``block.attn.qkv``.

    rmeeto.reduction.apply(deit, "rmeeto", r=5)               # every block, ordered, proportional attention
    rmeeto.reduction.apply(deit, "tome", r=5, metric="k")     # ToMe
    rmeeto.reduction.apply(deit, "rmeeto", flops_cut=0.3)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn

from rmeeto.models.deit import ReducibleViT
from rmeeto.models.vim import TokenState
from rmeeto.reduction.merge import Merge, Plan, odd_even, ordered_slots, slots_from_order
from rmeeto.reduction.methods import bipartite_overhead, check_options
from rmeeto.reduction.plans import Order, similarity

Metric = Literal["x", "q", "k", "v"]
#: Methods that merge inside ViT blocks → their layout and whether they drop instead of merging.
IN_BLOCK_METHODS: dict[str, dict[str, Any]] = {
    "rmeeto": {"order": "ordered"},
    "tome": {"order": "unordered"},
    "shuffle": {"order": "odd_even"},
    "prune": {"order": "ordered", "prune": True},
}


def max_merge(n: int) -> int:
    """Most tokens one block can merge out of ``n`` (cls included): the A tokens besides cls, (n − 1) // 2."""
    return max(n - 1, 0) // 2


@dataclass(frozen=True)
class InBlockMerge:
    """Bipartite merging inside ViT blocks; r tokens per block (capped at (N − 1) // 2).

    order: ordered (R-MeeTo), unordered (ToMe), odd_even (shuffle ablation); prune: drop instead of merge;
    metric: the stream ``x`` or the attention's ``q``/``k``/``v`` (mean over heads); prop_attn: add
    log(size) to the attention logits.
    """

    order: Order = "ordered"
    prune: bool = False
    metric: Metric = "x"
    prop_attn: bool = True
    r_kind: ClassVar[str] = "count"

    def __post_init__(self) -> None:
        check_options(self)

    def removed(self, m: int, r: float) -> int:
        """Tokens merged out of ``m`` candidates (cls excluded): r, capped at m // 2 = (N − 1) // 2."""
        count = int(r)
        if count != r or count < 0:
            raise ValueError(f"r={r}: the tokens merged per block must be an integer ≥ 0")
        return min(count, max_merge(m + 1))

    def overhead(self, n: int, removed: int, c: int) -> float:
        """Matching cost in the papers' convention, N = tokens entering the block: 6·N·C + 2C·(N/2)² + r·C."""
        return bipartite_overhead(n, removed, c)


@dataclass(frozen=True)
class InBlockSchedule:
    """Merge ``r[j]`` tokens inside block ``blocks[j]`` (blocks may include 0)."""

    blocks: tuple[int, ...]
    r: tuple[float, ...]
    final_tokens: ClassVar[None] = None
    #: Read by :class:`~rmeeto.models.deit.ReducibleViT` and :mod:`rmeeto.flops`: the merge is inside the block.
    inside_blocks: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if len(self.blocks) != len(self.r):
            raise ValueError(f"{len(self.blocks)} blocks but {len(self.r)} values of r")
        if any(b < 0 for b in self.blocks) or list(self.blocks) != sorted(set(self.blocks)):
            raise ValueError(f"blocks must be increasing and ≥ 0: {self.blocks}")

    def token_counts(self, method: InBlockMerge, n0: int, depth: int) -> list[tuple[int, int]]:
        """(tokens entering block i, tokens merged inside it) for every block; n counts cls."""
        if self.blocks and self.blocks[-1] >= depth:
            raise ValueError(f"schedule block {self.blocks[-1]} ≥ model depth {depth}")
        points = dict(zip(self.blocks, self.r, strict=True))
        counts, n = [], n0
        for i in range(depth):
            removed = method.removed(n - 1, points[i]) if i in points else 0
            counts.append((n, removed))
            n -= removed
        return counts


def in_block_plan(metric: Tensor, r: int, order: Order = "ordered", prune: bool = False) -> Plan:
    """§5 matching on the B×N×F ``metric`` of all tokens (cls at 0) → a plan over all N tokens, cls in slot 0.

    A = even positions, B = odd; each A token scores its most cosine-similar B token, cls scores −∞; the
    r = min(r, (N − 1) // 2) best-scoring A tokens join their partner's slot (``prune``: are dropped).
    """
    b, n, _ = metric.shape
    r = min(r, max_merge(n))
    positions = torch.arange(n, device=metric.device).expand(b, n)
    if r == 0:
        return Plan(positions.clone(), n)
    scores = similarity(metric[:, 0::2], metric[:, 1::2])  # B×Na×Nb, fp32 cosine
    scores[:, 0] = -math.inf  # cls is never merged
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(dim=-1, descending=True)
    src, unmerged = edge[:, :r], edge[:, r:]
    merged_a = torch.zeros_like(node_max, dtype=torch.bool).scatter_(1, src, True)
    survive = torch.ones(b, n, dtype=torch.bool, device=metric.device)
    survive[:, 0::2] = ~merged_a
    if order == "ordered":
        slots = ordered_slots(survive)
    elif order == "odd_even":
        listed = positions[survive].view(b, n - r)
        slots = slots_from_order(torch.cat([listed[:, :1], odd_even(listed[:, 1:])], dim=1), n)
    elif order == "unordered":
        b_positions = positions[:, 1::2]
        slots = slots_from_order(torch.cat([2 * unmerged.sort(dim=1).values, b_positions], dim=1), n)
    else:
        raise ValueError(f"unknown order {order!r}; choose from {get_args(Order)}")
    partner = torch.full_like(node_idx, -1) if prune else slots[:, 1::2].gather(1, node_idx)
    dest = slots.clone()
    dest[:, 0::2] = torch.where(merged_a, partner, slots[:, 0::2])
    return Plan(dest, n - r)


class InBlockReduction:
    """A :class:`~rmeeto.models.deit.ReducibleViT`'s ``token_reducer`` that merges inside blocks.

    Called by block i with the stream after attention; merges it per ``schedule`` and carries token sizes
    (and, with ``track_source``, a B×N×N₀ count of the original tokens each token holds). :meth:`set_recording`
    (called by :func:`rmeeto.reduction.attach` / ``remove``) installs / removes the module hooks.
    """

    inside_blocks: ClassVar[bool] = True

    def __init__(self, model: ReducibleViT, method: InBlockMerge, schedule: InBlockSchedule,
                 track_source: bool = False):
        self.method, self.schedule, self.track_source = method, schedule, track_source
        self._r_at = dict(zip(schedule.blocks, schedule.r, strict=True))
        self._blocks: list[nn.Module] = list(model.layers)
        schedule.token_counts(method, model.cfg.num_patches + 1, len(self._blocks))  # validates the schedule
        self._size: Tensor | None = None  # sizes of the tokens entering the next attention (this forward)
        self._qkv: Tensor | None = None  # B×N×3·H·d of the current block's attention (metric q/k/v)
        self._handles: list[Any] = []
        self._attention_seen: int | None = None  # the block whose attention ran last (a check of the call site)

    def __call__(self, block: int, state: TokenState) -> TokenState:
        if self._handles and self._attention_seen != block:
            raise RuntimeError(f"{type(self).__name__} called for block {block} before that block's attention ran: "
                               "the model must call it inside blocks (a wrapper must copy ``inside_blocks``)")
        qkv, self._qkv = self._qkv, None
        r = self._r_at.get(block, 0)
        b, n, _ = state.hidden.shape
        if self.method.removed(n - 1, r) == 0:
            self._size = state.size
            return state
        size = state.size if state.size is not None else state.hidden.new_ones(b, n, dtype=torch.float32)
        if self.track_source and state.source is None:
            state.source = torch.eye(n, device=size.device).expand(b, n, n)
        with torch.no_grad(), torch.autocast(state.hidden.device.type, enabled=False):
            plan = in_block_plan(self._metric(block, state.hidden, qkv), int(r), self.method.order,
                                 self.method.prune)
        merge = Merge(plan, size)
        out = TokenState(hidden=merge(state.hidden), residual=None, cls_index=state.cls_index, size=merge.sizes(),
                         source=merge.sums(state.source) if state.source is not None else None)
        self._size = out.size
        return out

    def _metric(self, block: int, hidden: Tensor, qkv: Tensor | None) -> Tensor:
        """B×N×F tokens to match by: the stream, or q/k/v of this block's attention averaged over heads."""
        if self.method.metric == "x":
            return hidden
        if qkv is None:
            raise RuntimeError(f"metric {self.method.metric!r} needs block {block}'s qkv: attach the reducer "
                               "with rmeeto.reduction.apply / attach so that it can hook the attention")
        attn = self._blocks[block].attn
        b, n, _ = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # B×H×N×d
        chosen = {"q": lambda: attn.q_norm(q), "k": lambda: attn.k_norm(k), "v": lambda: v}[self.method.metric]()
        return chosen.mean(dim=1)

    def _attention_bias(self, block: int, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Forward pre-hook of block ``block``'s attention: log(size) of each key as ``attn_mask`` B×1×1×N
        (prune's sizes stay 1: no bias)."""
        self._attention_seen = block
        if block == 0:
            self._size = None  # a new forward: every token has size 1
        if self._size is None or not self.method.prop_attn:
            return None
        x = args[0]
        if self._size.shape != x.shape[:2]:
            raise RuntimeError(f"token sizes {tuple(self._size.shape)} do not match the attention input "
                               f"{tuple(x.shape)} at block {block}: was the reducer skipped in a block?")
        bias = self._size.log().to(x.dtype)[:, None, None, :]
        if kwargs.get("attn_mask") is not None:
            bias = bias + kwargs["attn_mask"]
        return args, {**kwargs, "attn_mask": bias}

    def _keep_qkv(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._qkv = output

    def set_recording(self, on: bool) -> None:
        """Install (``on``) or remove the attention hooks: the size bias (with ``prop_attn``; it also checks
        that the reducer is called inside the blocks) and the qkv record (metric q/k/v)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._size, self._qkv, self._attention_seen = [], None, None, None
        if not on:
            return
        for i, block in enumerate(self._blocks):
            self._handles.append(block.attn.register_forward_pre_hook(partial(self._attention_bias, i),
                                                                      with_kwargs=True))
            if self.method.metric != "x":
                if not isinstance(getattr(block.attn, "qkv", None), nn.Linear):
                    raise ValueError(f"metric {self.method.metric!r} needs a fused qkv Linear in block {i}'s "
                                     "attention; use metric='x'")
                self._handles.append(block.attn.qkv.register_forward_hook(self._keep_qkv))


def default_placement(method: str) -> str:
    """Where ``method`` acts on a ViT unless told: inside blocks for the bipartite methods (the authors'
    placement), between blocks for the others (they have no in-block version)."""
    return "in_block" if method in IN_BLOCK_METHODS else "between"


def in_block_reduction(model: ReducibleViT, method: str, *, r: float | Sequence[float] | None,
                       flops_cut: float | None, blocks: Sequence[int] | None = None,
                       final_tokens: int | None = None, track_source: bool = False,
                       **options: Any) -> InBlockReduction:
    """:func:`rmeeto.reduction.apply` for the in-block placement: ``method`` in :data:`IN_BLOCK_METHODS`,
    ``r`` tokens per block (or one per entry of ``blocks``) or the ``flops_cut`` to solve r for; ``blocks``
    default to all. ``options``: :class:`InBlockMerge` fields (metric, prop_attn, order)."""
    from rmeeto.reduction.solver import solve_r  # imported here: the solver imports the package

    if method not in IN_BLOCK_METHODS:
        raise ValueError(f"method {method!r} has no in-block version on ViTs (those are "
                         f"{', '.join(IN_BLOCK_METHODS)}); pass placement='between'")
    try:
        merge = InBlockMerge(**{**IN_BLOCK_METHODS[method], **options})
    except TypeError as err:
        raise ValueError(f"bad option for method {method!r} inside ViT blocks: {err}") from err
    if (r is None) == (flops_cut is None):
        raise ValueError("give exactly one of r (tokens merged per block) and flops_cut")
    if final_tokens is not None:
        raise ValueError("final_tokens is a between-block schedule option; pass placement='between'")
    points = tuple(range(len(model.layers))) if blocks is None else tuple(blocks)

    def schedule_for(value: float | Sequence[float]) -> InBlockSchedule:
        return InBlockSchedule(points, tuple(value) if isinstance(value, Sequence) else (value,) * len(points))

    if flops_cut is not None:
        r = solve_r(model.cfg, merge, schedule_for, flops_cut)
    return InBlockReduction(model, merge, schedule_for(r), track_source=track_source)
