"""Reduction methods: each turns :class:`Signals` and an amount into a plan.

A method says how many tokens it removes from M candidates (so FLOPs can be counted without
running the model), whether it needs the mixer's Δ/B/C record, and its matching cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol

from rmeeto.reduction.merge import MERGE_OPS, MergeOp, Plan
from rmeeto.reduction.plans import DISTANCES, ORDERS, Distance, Order, bipartite_plan, grouped_plan
from rmeeto.reduction.signals import FEATURES, INDICATORS, Feature, Indicator, Signals


class Method(Protocol):
    """What :class:`~rmeeto.reduction.reducer.TokenReduction` needs from a method."""

    op: MergeOp
    #: "count": the amount is a number of tokens per point; "ratio": a fraction of the candidates.
    amount_kind: ClassVar[str]

    @property
    def needs_record(self) -> bool: ...

    def removed(self, m: int, amount: float) -> int:
        """Tokens removed from ``m`` candidates (cls excluded) at ``amount``."""

    def plan(self, signals: Signals, amount: float) -> Plan: ...

    def overhead(self, n: int, removed: int, c: int) -> float:
        """Multiply-adds of the matching for ``n`` tokens (cls included) and embed dim ``c``."""


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose from {allowed}")


def bipartite_overhead(n: int, removed: int, c: int) -> float:
    """R-MeeTo's matching cost in the papers' convention: 6·N·C + 2C·(N/2)² + r·C."""
    return 6 * n * c + 2 * c * (n / 2) ** 2 + removed * c


@dataclass(frozen=True)
class BipartiteMerge:
    """R-MeeTo ordered bipartite merging and its ablations; amount = r tokens per point.

    metric: what tokens are matched by (hidden ``x``, or Δ, B, C); distance: cosine/L1/L2; kth: match
    the k-th closest partner; order: ordered (R-MeeTo), odd_even shuffle, unordered (ToMe);
    prune: drop instead of merge; op: wavg (the paper's "sum"), mean, max, min.
    """

    prune: bool = False
    metric: Feature = "x"
    distance: Distance = "cosine"
    kth: int = 1
    order: Order = "ordered"
    op: MergeOp = "wavg"
    amount_kind: ClassVar[str] = "count"

    def __post_init__(self) -> None:
        _check("metric", self.metric, FEATURES)
        _check("distance", self.distance, DISTANCES)
        _check("order", self.order, ORDERS)
        _check("merge op", self.op, MERGE_OPS)
        if self.kth < 1:
            raise ValueError(f"kth must be ≥ 1, got {self.kth}")

    @property
    def needs_record(self) -> bool:
        return self.metric != "x"

    def removed(self, m: int, amount: float) -> int:
        r, num_a = int(amount), (m + 1) // 2
        if r != amount or not 0 <= r <= num_a:
            raise ValueError(f"r={amount} tokens to merge, but only {num_a} A-set candidates among {m} "
                             f"tokens (cls excluded); r must be an integer in [0, {num_a}]")
        return r

    def plan(self, signals: Signals, amount: float) -> Plan:
        return bipartite_plan(signals.features(self.metric), int(amount), distance=self.distance,
                              kth=self.kth, order=self.order, prune=self.prune)

    def overhead(self, n: int, removed: int, c: int) -> float:
        return bipartite_overhead(n, removed, c)


@dataclass(frozen=True)
class MTR:
    """Training-free Mamba token reduction; amount = ratio r of the current non-cls tokens.

    Tokens ranked by ``indicator`` (Δ by default); top n = int(r·M) kept, bottom n merged into the
    most similar of the middle M − 2n (``variant`` merge / prune / hybrid).
    """

    variant: Literal["merge", "prune", "hybrid"] = "merge"
    indicator: Indicator = "delta"
    metric: Feature = "x"
    distance: Distance = "cosine"
    order: Order = "ordered"
    op: MergeOp = "wavg"
    amount_kind: ClassVar[str] = "ratio"

    def __post_init__(self) -> None:
        _check("MTR variant", self.variant, ("merge", "prune", "hybrid"))
        _check("indicator", self.indicator, INDICATORS)
        _check("metric", self.metric, FEATURES)
        _check("distance", self.distance, DISTANCES)
        _check("order", self.order, ("ordered", "odd_even"))
        _check("merge op", self.op, MERGE_OPS)

    @property
    def needs_record(self) -> bool:
        return self.indicator != "cls" or self.metric != "x"

    def removed(self, m: int, amount: float) -> int:
        if not 0 <= amount < 0.5:
            raise ValueError(f"MTR ratio must be in [0, 0.5), got {amount}")
        return int(amount * m)

    def plan(self, signals: Signals, amount: float) -> Plan:
        n = self.removed(signals.hidden.shape[1], amount)
        return grouped_plan(signals.importance(self.indicator), signals.features(self.metric), n,
                            distance=self.distance, op=self.variant, order=self.order)

    def overhead(self, n: int, removed: int, c: int) -> float:
        """Normalisation, Δ averaging and the source × target similarities."""
        m = n - 1
        return 6 * n * c + 2 * c * removed * (m - 2 * removed) + removed * c
