"""Pure tensor functions that carry out a reduction plan.

A *plan* says, for each of the M candidate tokens of every image (cls excluded), which output slot
it goes to (``dest``: B×M, values in [0, K)) or that it is dropped (``-1``), and which of the K + 1
output slots the cls token takes (``cls_slot``: B). Slots are numbered in output order, so the plan also
fixes the order of the survivors. Every reducer in this package only builds plans; :class:`Merge`
is the one place where tokens are combined.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

MergeOp = Literal["wavg", "mean", "max", "min"]


class Plan(NamedTuple):
    """dest: B×M long, slot per candidate token or -1 (dropped). num_out: K, slots per image (cls aside).
    cls_slot: B long, the cls token's slot among the K + 1 output tokens (None: the plan has no cls)."""

    dest: Tensor
    num_out: int
    cls_slot: Tensor | None = None


class Merge:
    """Merging by one plan, its slot rows (and weight sums) worked out once for every stream merged by it: a
    reducer merges the hidden and residual streams and sums the token sizes and the source map by one plan
    (at batch 1, each of the few dozen small tensor ops this saves costs as much as the arithmetic).

    ``op`` (for :meth:`__call__`): ``wavg``: Σ x·w / Σ w over the tokens sent to a slot (R-MeeTo's
    size-weighted average, which the authors call "sum"; ``weight`` = token sizes, B×M). ``mean``: the same
    with all weights 1. ``max``/``min``: channel-wise extreme. Each stream is combined in its own dtype.
    """

    def __init__(self, plan: Plan, weight: Tensor, op: MergeOp = "wavg"):
        self.plan, self.weight, self.op = plan, weight, op
        k = plan.num_out
        self._dest = torch.where(plan.dest < 0, k, plan.dest)  # dropped tokens go to a spare slot K
        self._rows = flat_rows(self._dest, k + 1)
        self._weight_sums: dict[torch.dtype, Tensor] = {}

    def sums(self, values: Tensor) -> Tensor:
        """B×M(×…) → B×K(×…): plain sums per slot (token sizes, source maps), each slot adding its tokens in
        token order; dropped tokens vanish. index_add_ adds whole rows: several times faster on CPU than
        scatter_add_ with an index expanded over the channels, with the same sums."""
        (b, m), k, rest = self._dest.shape, self.plan.num_out, values.shape[2:]
        out = values.new_zeros(b * (k + 1), *rest).index_add_(0, self._rows, values.reshape(b * m, *rest))
        return out.view(b, k + 1, *rest)[:, :k]

    def __call__(self, x: Tensor) -> Tensor:
        """Combine B×M×C tokens into B×K×C by the plan with ``op``."""
        if self.op in ("max", "min"):
            (b, m, c), k = x.shape, self.plan.num_out
            index = self._dest[..., None].expand(b, m, c)
            out = x.new_zeros(b, k + 1, c).scatter_reduce(1, index, x, include_self=False,
                                                          reduce="amax" if self.op == "max" else "amin")
            return out[:, :k]
        summed = self.sums(x if self.op == "mean" else x * self._weights(x.dtype)[..., None])  # x·1 is x: a pass fewer
        return summed / self._summed_weights(x.dtype)[..., None]

    def sizes(self) -> Tensor:
        """B×K: the merged tokens' sizes, the weights summed per slot (shared with ``wavg``'s denominators)."""
        return self._summed_weights(self.weight.dtype) if self.op == "wavg" else self.sums(self.weight)

    def _weights(self, dtype: torch.dtype) -> Tensor:
        """B×M weights of ``op`` in ``dtype``: the token sizes (wavg) or ones (mean)."""
        return (self.weight if self.op == "wavg" else torch.ones_like(self.weight)).to(dtype)

    def _summed_weights(self, dtype: torch.dtype) -> Tensor:
        if dtype not in self._weight_sums:
            self._weight_sums[dtype] = self.sums(self._weights(dtype))
        return self._weight_sums[dtype]


def mask_of(index: Tensor, m: int) -> Tensor:
    """B×K token indices → B×M bool, True at those tokens."""
    return torch.zeros(index.shape[0], m, dtype=torch.bool, device=index.device).scatter_(1, index, True)


def ordered_slots(survive: Tensor) -> Tensor:
    """B×M bool survivors → B×M slot of each survivor in original sequence order (-1 elsewhere)."""
    return torch.where(survive, survive.long().cumsum(1) - 1, -1)


def slots_from_order(order: Tensor, m: int) -> Tensor:
    """B×K token indices listed in output order → B×M slot per token (-1 for tokens not listed)."""
    b, k = order.shape
    slots = torch.full((b, m), -1, dtype=torch.long, device=order.device)
    return slots.scatter_(1, order, torch.arange(k, device=order.device).expand(b, k))


def odd_even(order: Tensor) -> Tensor:
    """Odd-even shuffle of a B×K order (R-MeeTo's order ablation): [0,1,2,3] → [0,2,1,3]."""
    return torch.cat([order[:, 0::2], order[:, 1::2]], dim=1)


def others_index(cls_index: Tensor, n: int) -> Tensor:
    """B×(N−1) positions of the non-cls tokens of each image, in order (cls_index: B)."""
    j = torch.arange(n - 1, device=cls_index.device)
    return j + (j >= cls_index[:, None]).long()


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """B×N×F, B×K indices → B×K×F rows. index_select on the flattened rows: several times faster on CPU
    than gather with an index expanded over the features (same values: both only copy)."""
    b, n, f = x.shape
    return x.reshape(b * n, f).index_select(0, flat_rows(index, n)).view(b, index.shape[1], f)


def flat_rows(index: Tensor, n: int) -> Tensor:
    """B×K indices into each image's N rows → (B·K,) indices into the B·N rows of the flattened batch."""
    return (index + torch.arange(index.shape[0], device=index.device)[:, None] * n).reshape(-1)


def remove_cls(x: Tensor, cls_index: Tensor) -> tuple[Tensor, Tensor]:
    """B×N×F, cls_index B → (B×F cls tokens, B×(N−1)×F the others in order)."""
    rows = torch.arange(x.shape[0], device=x.device)
    return x[rows, cls_index], take_rows(x, others_index(cls_index, x.shape[1]))


def with_cls(plan: Plan, cls_index: Tensor) -> Plan:
    """A plan over the M candidates → the same plan over all M + 1 tokens, with cls (at ``cls_index``)
    kept alone in its slot ``plan.cls_slot`` of K + 1 slots; the other slots move up past it. Merging with
    it equals merging the others and inserting cls there (cls has size 1), without the copies."""
    q = plan.cls_slot[:, None]
    dest = torch.where(plan.dest >= q, plan.dest + 1, plan.dest)
    b, m = dest.shape
    full = torch.empty(b, m + 1, dtype=dest.dtype, device=dest.device)
    full.scatter_(1, others_index(cls_index, m + 1), dest).scatter_(1, cls_index[:, None], q)
    return Plan(full, plan.num_out + 1, plan.cls_slot)


def proportional_cls_slot(cls_index: Tensor, n: int, removed: int) -> Tensor:
    """R-MeeTo's rule (the authors' code): cls goes back at int(p·(n−r)/n), n counting cls."""
    return cls_index * (n - removed) // n


def sequence_cls_slot(cls_index: Tensor, survive: Tensor) -> Tensor:
    """MTR's rule: cls goes back after exactly the survivors that preceded it (cls_index: B, survive: B×M)."""
    before = torch.arange(survive.shape[1], device=survive.device) < cls_index[:, None]
    return (survive & before).sum(1)
