"""Pure tensor functions that carry out a reduction plan.

A *plan* says, for each of the M candidate tokens of every image (cls excluded), which output slot
it goes to (``dest``: B×M, values in [0, K)) or that it is dropped (``-1``). Slots are numbered in
output order, so the plan also fixes the order of the survivors. Every reducer in this package
only builds plans; :func:`merge_tokens` is the one place where tokens are combined.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

MergeOp = Literal["wavg", "mean", "max", "min"]
MERGE_OPS: tuple[str, ...] = ("wavg", "mean", "max", "min")


class Plan(NamedTuple):
    """dest: B×M long, slot per candidate token or -1 (dropped). num_out: K, slots per image."""

    dest: Tensor
    num_out: int


def merge_tokens(x: Tensor, plan: Plan, weight: Tensor, op: MergeOp = "wavg") -> Tensor:
    """Combine B×M×C tokens into B×K×C following ``plan``.

    ``wavg``: Σ x·w / Σ w over the tokens sent to a slot (R-MeeTo's size-weighted average, which the
    authors call "sum"; ``weight`` = token sizes). ``mean``: the same with all weights 1.
    ``max``/``min``: channel-wise extreme. The computation is done in ``x``'s dtype.
    """
    if op not in MERGE_OPS:
        raise ValueError(f"unknown merge op {op!r}; choose from {MERGE_OPS}")
    b, m, c = x.shape
    k = plan.num_out
    dest = torch.where(plan.dest < 0, k, plan.dest)  # dropped tokens go to a spare slot K
    if op in ("max", "min"):
        index = dest[..., None].expand(b, m, c)
        out = x.new_zeros(b, k + 1, c).scatter_reduce(1, index, x, reduce="amax" if op == "max" else "amin",
                                                      include_self=False)
        return out[:, :k]
    w = (weight if op == "wavg" else torch.ones_like(weight)).to(x.dtype)
    num = slot_sums(x * w[..., None], dest, k + 1)
    den = slot_sums(w, dest, k + 1)
    return num[:, :k] / den[:, :k, None]


def slot_sums(values: Tensor, dest: Tensor, k: int) -> Tensor:
    """B×M(×…) values summed into B×k(×…) slots by ``dest`` (B×M in [0, k)), each slot adding its tokens
    in token order. index_add_ adds whole rows: several times faster on CPU than scatter_add_ with an
    index expanded over the channels, with the same sums."""
    b, m = dest.shape
    rows = (dest + torch.arange(b, device=dest.device)[:, None] * k).reshape(b * m)
    out = values.new_zeros(b * k, *values.shape[2:])
    return out.index_add_(0, rows, values.reshape(b * m, *values.shape[2:])).view(b, k, *values.shape[2:])


def sum_into_slots(values: Tensor, plan: Plan) -> Tensor:
    """B×M(×…) → B×K(×…): plain sums per slot (token sizes, source maps); dropped tokens vanish."""
    k = plan.num_out
    dest = torch.where(plan.dest < 0, k, plan.dest)
    return slot_sums(values, dest, k + 1)[:, :k]


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


def remove_cls(x: Tensor, cls_index: int) -> tuple[Tensor, Tensor]:
    """B×N×… → (B×1×… cls token, B×(N−1)×… the others)."""
    return x[:, cls_index:cls_index + 1], torch.cat([x[:, :cls_index], x[:, cls_index + 1:]], dim=1)


def with_cls(plan: Plan, cls_index: int, new_index: int) -> Plan:
    """A plan over the M candidates → the same plan over all M + 1 tokens, with cls (at ``cls_index``)
    kept alone in slot ``new_index`` of K + 1 slots; the other slots move up past it. Merging with it
    equals merging the others and inserting cls at ``new_index`` (cls has size 1), without the copies."""
    dest = torch.where(plan.dest >= new_index, plan.dest + 1, plan.dest)
    cls_slot = torch.full_like(dest[:, :1], new_index)
    return Plan(torch.cat([dest[:, :cls_index], cls_slot, dest[:, cls_index:]], dim=1), plan.num_out + 1)


def new_cls_index(cls_index: int, n: int, removed: int) -> int:
    """Where cls goes after removing ``removed`` of ``n`` tokens (n counts cls): int(p·(n−r)/n)."""
    return int(cls_index * (n - removed) / n)
