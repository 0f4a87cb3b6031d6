"""Plan builders: pure functions from per-token signals to a :class:`~rmeeto.reduction.merge.Plan`.

All inputs exclude the cls token; M is the number of candidate tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from rmeeto.reduction.merge import Plan, odd_even, ordered_slots, slots_from_order

Distance = Literal["cosine", "l1", "l2"]
Order = Literal["ordered", "odd_even", "unordered"]
DISTANCES: tuple[str, ...] = ("cosine", "l1", "l2")
ORDERS: tuple[str, ...] = ("ordered", "odd_even", "unordered")


def similarity(a: Tensor, b: Tensor, distance: Distance = "cosine") -> Tensor:
    """B×Ma×F, B×Mb×F → B×Ma×Mb, larger = more alike (cosine, or minus the L1/L2 distance)."""
    if distance == "cosine":
        a = a / a.norm(dim=-1, keepdim=True)
        b = b / b.norm(dim=-1, keepdim=True)
        return a @ b.transpose(-1, -2)
    if distance in ("l1", "l2"):
        return -torch.cdist(a.float(), b.float(), p=1.0 if distance == "l1" else 2.0).to(a.dtype)
    raise ValueError(f"unknown distance {distance!r}; choose from {DISTANCES}")


def best_match(scores: Tensor, kth: int = 1) -> tuple[Tensor, Tensor]:
    """Score and index of each row's k-th most similar column: B×Ma×Mb → (B×Ma, B×Ma)."""
    if kth == 1:
        return scores.max(dim=-1)
    if not 1 <= kth <= scores.shape[-1]:
        raise ValueError(f"kth={kth} needs 1 ≤ kth ≤ {scores.shape[-1]} (number of match candidates)")
    values, index = scores.topk(kth, dim=-1)
    return values[..., -1], index[..., -1]


def finish_plan(survive: Tensor, partner: Tensor, merged: Tensor, prune: bool, order: Order,
                explicit_order: Tensor | None = None) -> Plan:
    """Build a plan from survivors and merge partners.

    survive: B×M bool. partner: B×M index of the survivor each merged token joins. merged: B×M bool.
    ``order`` places survivors: original sequence order, its odd-even shuffle, or ``explicit_order``
    (B×K token indices, for the ToMe-style unordered layout).
    """
    m = survive.shape[1]
    k = int(survive[0].sum())
    slots = ordered_slots(survive)
    if order == "odd_even":
        listed = slots.masked_fill(~survive, m).argsort(dim=1)[:, :k]
        slots = slots_from_order(odd_even(listed), m)
    elif order == "unordered":
        if explicit_order is None:
            raise ValueError("order='unordered' is only defined for bipartite matching")
        slots = slots_from_order(explicit_order, m)
    elif order != "ordered":
        raise ValueError(f"unknown order {order!r}; choose from {ORDERS}")
    joined = torch.full_like(slots, -1) if prune else slots.gather(1, partner.clamp(min=0))
    return Plan(torch.where(merged, joined, slots), k)


def bipartite_plan(metric: Tensor, r: int, *, distance: Distance = "cosine", kth: int = 1,
                   order: Order = "ordered", prune: bool = False) -> Plan:
    """R-MeeTo / ToMe bipartite matching on B×M×F metric; removes ``r`` tokens.

    A = even positions, B = odd positions; each A token scores its best B token; the ``r`` A tokens
    with the highest score join (or, with ``prune``, are dropped in favour of) their partner.
    """
    b, m, _ = metric.shape
    num_a, num_b = (m + 1) // 2, m // 2
    if r < 0 or r > num_a or (r > 0 and num_b == 0):
        raise ValueError(f"r={r} tokens to merge, but only {num_a} A-set candidates "
                         f"({m} tokens without cls); use r ≤ {num_a if num_b else 0}")
    device = metric.device
    scores = similarity(metric[:, 0::2], metric[:, 1::2], distance)
    node_max, node_idx = best_match(scores, kth)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    src, unm = edge_idx[:, :r], edge_idx[:, r:]
    merged = torch.zeros(b, m, dtype=torch.bool, device=device)
    merged[:, 0::2] = torch.zeros_like(node_max, dtype=torch.bool).scatter_(1, src, True)
    partner = torch.full((b, m), -1, dtype=torch.long, device=device)
    partner[:, 0::2] = 2 * node_idx + 1
    b_pos = 2 * torch.arange(num_b, device=device) + 1
    tome_order = torch.cat([2 * unm, b_pos.expand(b, num_b)], dim=1)
    return finish_plan(~merged, partner, merged, prune, order, tome_order)


def grouped_plan(importance: Tensor, metric: Tensor, n: int, *, distance: Distance = "cosine",
                 op: Literal["merge", "prune", "hybrid"] = "merge", order: Order = "ordered") -> Plan:
    """MTR grouping: by importance (B×M), the top ``n`` are kept, the bottom ``n`` are sources and the
    middle M − 2n are targets; each source joins its most similar target (metric B×M×F).

    ``prune`` drops the sources; ``hybrid`` merges the more important half of the sources and drops
    the rest (our reading of the MTR ablation, whose text does not define the split).
    """
    b, m = importance.shape
    if n < 0 or 2 * n > m or (n > 0 and 2 * n == m and op != "prune"):
        raise ValueError(f"MTR groups of n={n} need 2n < M={m} tokens (a non-empty target group)")
    rank = importance.argsort(dim=1, descending=True)
    source, target = rank[:, m - n:], rank[:, n:m - n]
    feats = lambda idx: metric.gather(1, idx[..., None].expand(-1, -1, metric.shape[-1]))  # noqa: E731
    best = similarity(feats(source), feats(target), distance).argmax(dim=-1) if n else source
    partner = torch.full((b, m), -1, dtype=torch.long, device=importance.device)
    partner.scatter_(1, source, target.gather(1, best))
    merged = torch.zeros(b, m, dtype=torch.bool, device=importance.device).scatter_(1, source, True)
    plan = finish_plan(~merged, partner, merged, prune=op == "prune", order=order)
    if op == "hybrid":  # the less important half of the sources (the tail of `source`) is dropped
        dropped = source[:, (n + 1) // 2:]
        plan = Plan(plan.dest.scatter(1, dropped, -1), plan.num_out)
    elif op not in ("merge", "prune"):
        raise ValueError(f"unknown MTR op {op!r}; choose from merge, prune, hybrid")
    return plan


def importance_order_plan(importance: Tensor, n: int, order: Order = "ordered") -> Plan:
    """Drop the ``n`` least important tokens (B×M importance); survivors keep their order."""
    b, m = importance.shape
    if not 0 <= n < m:
        raise ValueError(f"cannot drop n={n} of M={m} tokens")
    drop = importance.argsort(dim=1)[:, :n]
    merged = torch.zeros(b, m, dtype=torch.bool, device=importance.device).scatter_(1, drop, True)
    return finish_plan(~merged, torch.full((b, m), -1, device=importance.device), merged, True, order)

