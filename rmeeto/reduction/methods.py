"""Reduction methods: each turns :class:`Signals` and a token count into a plan.

A method converts the user's per-point setting ``r`` (tokens for R-MeeTo, a ratio of the current
non-cls tokens for MTR-style methods: ``r_kind``) into the count of tokens it removes from M candidates
(``removed``, checked there, once, when the reducer is built), says whether it needs the mixer's Δ/B/C
record and what its matching costs.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

from torch import Tensor

from rmeeto.reduction.merge import MergeOp, Plan
from rmeeto.reduction.plans import ClsRule, Distance, Order, Variant, bipartite_plan, grouped_plan, mtr_groups
from rmeeto.reduction.signals import Feature, Indicator, Signals

RKind = Literal["count", "ratio"]


class Method(Protocol):
    """What :class:`~rmeeto.reduction.reducer.TokenReduction` needs from a method."""

    op: MergeOp
    #: "count": r is a number of tokens per point; "ratio": a fraction of the current candidates.
    r_kind: ClassVar[RKind]

    @property
    def needs_record(self) -> bool: ...

    def removed(self, m: int, r: float) -> int:
        """Tokens removed from ``m`` candidates (cls excluded) at setting ``r``; ValueError if impossible."""

    def plan(self, signals: Signals, removed: int) -> Plan:
        """The plan removing ``removed`` tokens (a count :meth:`removed` returned)."""

    def overhead(self, n: int, removed: int, c: int) -> float:
        """Multiply-adds of the matching for ``n`` tokens (cls included) and embed dim ``c``."""


def check_options(method: object) -> None:
    """ValueError naming the first field of a method dataclass whose value is not one of its ``Literal``'s."""
    hints = typing.get_type_hints(type(method))
    for field in dataclasses.fields(method):
        allowed = typing.get_args(hints[field.name]) if typing.get_origin(hints[field.name]) is Literal else ()
        if allowed and getattr(method, field.name) not in allowed:
            raise ValueError(f"unknown {field.name} {getattr(method, field.name)!r} for "
                             f"{type(method).__name__}; choose from {allowed}")


def ratio_count(name: str, r: float, m: int, upper: float, closed: bool) -> int:
    """int(r·m) after checking the ratio lies in [0, upper] (or [0, upper))."""
    if not (0 <= r <= upper if closed else 0 <= r < upper):
        raise ValueError(f"{name} ratio r must be in [0, {upper}{']' if closed else ')'}, got {r}")
    return int(r * m)


def bipartite_overhead(n: int, removed: int, c: int) -> float:
    """R-MeeTo's matching cost in the papers' convention: 6·N·C + 2C·(N/2)² + r·C."""
    return 6 * n * c + 2 * c * (n / 2) ** 2 + removed * c


@dataclass(frozen=True)
class BipartiteMerge:
    """R-MeeTo ordered bipartite merging and its ablations; r = tokens per point.

    metric: what tokens are matched by (hidden ``x``, or Δ, B, C); distance: cosine/L1/L2 between the
    normalised metric; kth: match the k-th closest partner; order: ordered (R-MeeTo), odd_even shuffle,
    unordered (ToMe layout); prune: drop instead of merge; op: wavg (the paper's "sum"), mean, max, min.
    cls goes back at int(p·(N−r)/N), the authors' rule (the unordered layout has its own, see
    :func:`~rmeeto.reduction.plans.bipartite_plan`).
    """

    prune: bool = False
    metric: Feature = "x"
    distance: Distance = "cosine"
    kth: int = 1
    order: Order = "ordered"
    op: MergeOp = "wavg"
    r_kind: ClassVar[RKind] = "count"
    cls_rule: ClassVar[ClsRule] = "proportional"

    def __post_init__(self) -> None:
        check_options(self)
        if self.kth < 1:
            raise ValueError(f"kth must be ≥ 1, got {self.kth}")

    @property
    def needs_record(self) -> bool:
        return self.metric != "x"

    @property
    def kernel_merges(self) -> bool:
        """R-MeeTo's own variant (matching by the hidden state, ordered, merged by size-weighted average), which
        rmeeto.reduction.merge_cpu carries out in one kernel at inference."""
        return self.metric == "x" and self.order == "ordered" and not self.prune and self.op == "wavg"

    def removed(self, m: int, r: float) -> int:
        num_a = (m + 1) // 2 if m > 1 else 0
        if int(r) != r or not 0 <= r <= num_a:
            raise ValueError(f"r={r} tokens to merge, but only {num_a} A-set candidates among {m} "
                             f"tokens (cls excluded) at this point")
        return int(r)

    def plan(self, signals: Signals, removed: int) -> Plan:
        return bipartite_plan(signals.features(self.metric), removed, distance=self.distance, kth=self.kth,
                              order=self.order, prune=self.prune, cls_index=signals.cls_index,
                              cls_rule=self.cls_rule)

    def overhead(self, n: int, removed: int, c: int) -> float:
        return bipartite_overhead(n, removed, c)


@dataclass(frozen=True)
class MTR:
    """Training-free Mamba token reduction; r = ratio of the current non-cls tokens.

    Tokens ranked by ``indicator`` (Δ by default); top n = int(r·M) kept, bottom n merged into the
    most similar of the middle M − 2n (``variant`` merge / prune / hybrid). ``op`` ``mean`` is the paper's
    "mean of their token vectors" (the default); ``wavg`` weights by token size instead. The survivors and
    cls keep their original sequence order.
    """

    variant: Variant = "merge"
    indicator: Indicator = "delta"
    metric: Feature = "x"
    distance: Distance = "cosine"
    order: Literal["ordered", "odd_even"] = "ordered"
    op: MergeOp = "mean"
    r_kind: ClassVar[RKind] = "ratio"

    def __post_init__(self) -> None:
        check_options(self)

    @property
    def needs_record(self) -> bool:
        return self.indicator != "cls" or self.metric != "x"

    @property
    def kernel_merges(self) -> bool:
        """Merging by the plain mean in sequence order, which rmeeto.reduction.merge_cpu carries out in one kernel at
        inference after the grouping (groups)."""
        return self.variant == "merge" and self.order == "ordered" and self.op == "mean"

    def groups(self, signals: Signals, removed: int) -> tuple[Tensor, Tensor]:
        """(source, joins): the ``removed`` tokens merged and the token each joins (B×removed indices among the M)."""
        return mtr_groups(signals.importance(self.indicator), signals.features(self.metric), removed, self.distance)

    def removed(self, m: int, r: float) -> int:
        n = ratio_count("MTR", r, m, 0.5, closed=False)
        if n and 2 * n >= m and self.variant != "prune":
            raise ValueError(f"MTR r={r} on M={m} tokens leaves no target token (needs 2·int(r·M) < M)")
        return n

    def plan(self, signals: Signals, removed: int) -> Plan:
        return grouped_plan(signals.importance(self.indicator), signals.features(self.metric), removed,
                            distance=self.distance, variant=self.variant, order=self.order,
                            cls_index=signals.cls_index)

    def overhead(self, n: int, removed: int, c: int) -> float:
        """Normalisation, Δ averaging and the source × target similarities."""
        m = n - 1
        return 6 * n * c + 2 * c * removed * (m - 2 * removed) + removed * c
