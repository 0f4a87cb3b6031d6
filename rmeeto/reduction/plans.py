"""Plan builders: pure functions from per-token signals to a :class:`~rmeeto.reduction.merge.Plan`.

All inputs exclude the cls token; M is the number of candidate tokens. Given ``cls_index`` (B, the cls
position in the full sequence), a builder also says where cls goes back (``Plan.cls_slot``) by
``cls_rule``: ``proportional`` is R-MeeTo's int(p·(N−r)/N) (the authors' code), ``sequence`` puts cls
after exactly the survivors that preceded it (MTR's reordering by original position; the rule for MTR
and the baselines it is compared with). Counts are checked by the methods (:mod:`.methods`), not here.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from rmeeto.reduction.merge import (
    Plan,
    mask_of,
    odd_even,
    ordered_slots,
    proportional_cls_slot,
    sequence_cls_slot,
    slots_from_order,
    take_rows,
)

Distance = Literal["cosine", "l1", "l2"]
Order = Literal["ordered", "odd_even", "unordered"]
ClsRule = Literal["proportional", "sequence"]
Variant = Literal["merge", "prune", "hybrid"]


def similarity(a: Tensor, b: Tensor, distance: Distance = "cosine") -> Tensor:
    """B×Ma×F, B×Mb×F → B×Ma×Mb fp32 scores, larger = more alike, between the L2-normalised vectors:
    cosine, or minus their L1 / L2 distance (the authors normalise the metric whatever the distance).
    Computed in fp32 with autocast off, so a bf16 run matches tokens as an fp32 run does."""
    with torch.autocast(a.device.type, enabled=False):
        a, b = a.float(), b.float()
        a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True)
        b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True)
        return unit_scores(a, b, distance)


def unit_scores(a: Tensor, b: Tensor, distance: Distance = "cosine") -> Tensor:
    """:func:`similarity` of vectors already divided by their norms (B×Ma×F, B×Mb×F fp32) → B×Ma×Mb."""
    if distance == "cosine":  # bmm, the kernel `@` calls for these shapes, without matmul's dispatch around it
        return torch.bmm(a, b.transpose(1, 2))
    return -torch.cdist(a, b, p=1.0 if distance == "l1" else 2.0)


def best_match(scores: Tensor, kth: int = 1) -> tuple[Tensor, Tensor]:
    """Score and index of each row's k-th most similar column: B×Ma×Mb → (B×Ma, B×Ma)."""
    if kth == 1:
        return scores.max(dim=-1)
    if kth > scores.shape[-1]:
        raise ValueError(f"kth={kth} needs kth ≤ {scores.shape[-1]} (number of match candidates)")
    values, index = scores.topk(kth, dim=-1)
    return values[..., -1], index[..., -1]


def finish_plan(merged: Tensor, partner: Tensor, removed: int, *, prune: bool = False, order: Order = "ordered",
                explicit_order: Tensor | None = None, cls_index: Tensor | None = None,
                cls_rule: ClsRule = "sequence") -> Plan:
    """Build a plan in which the ``merged`` tokens (B×M bool) join their ``partner`` (B×M index of a
    survivor) or, with ``prune``, are dropped; ``removed`` = how many per image.

    ``order`` places the survivors: original sequence order, its odd-even shuffle, or ``explicit_order``
    (B×K token indices, for the ToMe-style unordered layout).
    """
    survive = ~merged
    m, k = survive.shape[1], survive.shape[1] - removed
    slots = ordered_slots(survive)
    if order == "odd_even":
        listed = slots.masked_fill(~survive, m).argsort(dim=1)[:, :k]
        slots = slots_from_order(odd_even(listed), m)
    elif order == "unordered":
        slots = slots_from_order(explicit_order, m)
    joined = torch.full_like(slots, -1) if prune else slots.gather(1, partner.clamp(min=0))
    cls_slot = None
    if cls_index is not None:
        cls_slot = (proportional_cls_slot(cls_index, m + 1, removed) if cls_rule == "proportional"
                    else sequence_cls_slot(cls_index, survive))
    return Plan(torch.where(merged, joined, slots), k, cls_slot)


def bipartite_match(a: Tensor, b: Tensor, distance: Distance = "cosine", kth: int = 1) -> tuple[Tensor, Tensor]:
    """Bipartite matching of B×Na×F A tokens to B×Nb×F B tokens → (node_idx: B×Na, each A token's k-th closest
    B token; edge_idx: B×Na, the A tokens by descending score of that match, so its first r are merged)."""
    return rank_matches(similarity(a, b, distance), kth)


def rank_matches(scores: Tensor, kth: int = 1) -> tuple[Tensor, Tensor]:
    """:func:`bipartite_match` from its B×Na×Nb scores."""
    node_max, node_idx = best_match(scores, kth)
    return node_idx, node_max.argsort(dim=-1, descending=True)


def bipartite_plan(metric: Tensor, r: int, *, distance: Distance = "cosine", kth: int = 1,
                   order: Order = "ordered", prune: bool = False, cls_index: Tensor | None = None,
                   cls_rule: ClsRule = "proportional") -> Plan:
    """R-MeeTo / ToMe bipartite matching on B×M×F metric; removes ``r`` ≤ ⌈M/2⌉ tokens.

    A = even positions, B = odd positions; each A token scores its best B token; the ``r`` A tokens
    with the highest score join (or, with ``prune``, are dropped in favour of) their partner.
    ``unordered`` is the authors' ToMe layout: the unmerged A tokens by descending score, then the B
    tokens in order, with cls at int(p·(t1−r)/t1) (t1 = number of A tokens) whatever ``cls_rule``.
    """
    b, m, _ = metric.shape
    num_a, num_b = (m + 1) // 2, m // 2
    device = metric.device
    if r == 0:  # also covers M = 1 (no B token to match)
        return finish_plan(torch.zeros(b, m, dtype=torch.bool, device=device), torch.zeros(b, m, dtype=torch.long,
                           device=device), 0, order="ordered", cls_index=cls_index, cls_rule=cls_rule)
    node_idx, edge_idx = bipartite_match(metric[:, 0::2], metric[:, 1::2], distance, kth)
    src, unm = edge_idx[:, :r], edge_idx[:, r:]
    merged = torch.zeros(b, m, dtype=torch.bool, device=device)
    merged[:, 0::2] = mask_of(src, num_a)
    partner = torch.full((b, m), -1, dtype=torch.long, device=device)
    partner[:, 0::2] = 2 * node_idx + 1
    tome_order = None
    if order == "unordered":  # unmerged A by descending score, then the B tokens (odd positions) in order
        b_pos = 2 * torch.arange(num_b, device=device) + 1
        tome_order = torch.cat([2 * unm, b_pos.expand(b, num_b)], dim=1)
    plan = finish_plan(merged, partner, r, prune=prune, order=order, explicit_order=tome_order,
                       cls_index=cls_index, cls_rule=cls_rule)
    if order == "unordered" and cls_index is not None:
        plan = plan._replace(cls_slot=cls_index * (num_a - r) // num_a)
    return plan


def grouped_plan(importance: Tensor, metric: Tensor, n: int, *, distance: Distance = "cosine",
                 variant: Variant = "merge", order: Order = "ordered", cls_index: Tensor | None = None) -> Plan:
    """MTR grouping: by importance (B×M), the top ``n`` are kept, the bottom ``n`` are sources and the
    middle M − 2n are targets; each source joins its most similar target (metric B×M×F); 2n < M.

    ``prune`` drops the sources; ``hybrid`` merges the more important half of the sources and drops
    the rest (our reading of the MTR ablation, whose text does not define the split). cls goes back by
    the sequence rule.
    """
    b, m = importance.shape
    source, joins = mtr_groups(importance, metric, n, distance)
    partner = torch.full((b, m), -1, dtype=torch.long, device=importance.device).scatter_(1, source, joins)
    plan = finish_plan(mask_of(source, m), partner, n, prune=variant == "prune", order=order, cls_index=cls_index)
    if variant == "hybrid":  # the less important half of the sources (the tail of `source`) is dropped
        plan = plan._replace(dest=plan.dest.scatter(1, source[:, (n + 1) // 2:], -1))
    return plan


def mtr_groups(importance: Tensor, metric: Tensor, n: int, distance: Distance = "cosine") -> tuple[Tensor, Tensor]:
    """:func:`grouped_plan`'s grouping → (source: B×n, the ``n`` least important tokens; joins: B×n, the target each
    of them joins), token indices among the M."""
    m = importance.shape[1]
    rank = importance.argsort(dim=1, descending=True)
    source, target = rank[:, m - n:], rank[:, n:m - n]
    if not n:
        return source, source
    best = similarity(take_rows(metric, source), take_rows(metric, target), distance).argmax(dim=-1)
    return source, target.gather(1, best)


def importance_order_plan(importance: Tensor, n: int, order: Order = "ordered",
                          cls_index: Tensor | None = None) -> Plan:
    """Drop the ``n`` < M least important tokens (B×M importance); cls by the sequence rule."""
    b, m = importance.shape
    drop = mask_of(importance.argsort(dim=1)[:, :n], m)
    return finish_plan(drop, torch.full((b, m), -1, device=importance.device), n, prune=True, order=order,
                       cls_index=cls_index)
