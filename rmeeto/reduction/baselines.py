"""Training-free baselines the MTR paper compares with on Vim: EViT, PuMer, UTR, HSA, random drop.

Each is a frozen dataclass implementing :class:`~rmeeto.reduction.methods.Method` whose r is the
ratio of the current non-cls tokens removed at a reduction point (``removed = int(r·M)``).
As in the MTR paper's comparison ("all methods perform token reduction followed by token
reordering"), every method keeps the surviving tokens, cls included, in their original sequence
order (cls goes back after exactly the survivors that preceded it), and the reducer reduces the
hidden state and the residual with the same plan.

Overheads use the convention of :func:`~rmeeto.reduction.methods.bipartite_overhead` (multiply-adds
per image, N tokens before the point with cls, M = N − 1, C = embed dim): 6·N·C to normalise the
tokens, 2·C per scored pair, C per token fused into another, C per token for a reduction over
channels (an activation score). Sorting is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from torch import Tensor

from rmeeto.reduction.merge import MergeOp, Plan, mask_of, take_rows
from rmeeto.reduction.methods import RKind, bipartite_overhead, check_options, ratio_count
from rmeeto.reduction.plans import best_match, bipartite_plan, finish_plan, importance_order_plan, similarity
from rmeeto.reduction.signals import Signals

Score = Literal["clip", "l1", "l2", "raw"]


def activation_importance(hidden: Tensor, score: Score = "clip") -> Tensor:
    """B×M×C activations → B×M importance.

    ``clip``: mean over channels of max(0, x) (UTR's and HSA's indicator); ``l1``, ``l2``: the
    norms, and ``raw``: the plain channel mean (the alternatives in their ablations).
    """
    x = hidden.float()
    if score == "clip":
        return x.clamp(min=0).mean(-1)
    if score == "l1":
        return x.abs().sum(-1)
    if score == "l2":
        return x.norm(dim=-1)
    return x.mean(-1)


def fuse_plan(importance: Tensor, n_fused: int, cls_index: Tensor | None = None) -> Plan:
    """EViT fusion on B×M importance: the ``n_fused`` ≤ M least important tokens become one token.

    The fused token takes the place of the most important of them; all others stay, in order.
    Removes ``n_fused − 1`` tokens (none when ``n_fused`` ≤ 1).
    """
    b, m = importance.shape
    nothing = torch.zeros(b, m, dtype=torch.bool, device=importance.device)
    if n_fused <= 1:
        return finish_plan(nothing, nothing.long(), 0, cls_index=cls_index)
    fused = importance.argsort(dim=1)[:, :n_fused]  # ascending: the last one is the most important
    host = fused[:, -1:]
    merged = mask_of(fused, m).scatter_(1, host, False)
    return finish_plan(merged, host.expand(b, m), n_fused - 1, cls_index=cls_index)


def classified_plan(importance: Tensor, metric: Tensor, n: int, prune_frac: float,
                    cls_index: Tensor | None = None) -> Plan:
    """UTR on B×M importance and B×M×F metric; removes ``n`` ≤ M//2 tokens.

    The M//2 least important tokens form set A, the others set B. Each A token connects to its most
    cosine-similar B token; the ``n`` most similar connections are reduced: the int(prune_frac·n)
    least important of their A tokens are dropped, the others merged into their B partner.
    """
    b, m = importance.shape
    rank = importance.argsort(dim=1)
    a_idx, b_idx = rank[:, :m // 2], rank[:, m // 2:]
    score, best = best_match(similarity(take_rows(metric, a_idx), take_rows(metric, b_idx)))
    chosen = score.argsort(dim=1, descending=True)[:, :n]
    src = a_idx.gather(1, chosen)
    partner = torch.full((b, m), -1, dtype=torch.long, device=importance.device)
    partner.scatter_(1, src, b_idx.gather(1, best.gather(1, chosen)))
    plan = finish_plan(mask_of(src, m), partner, n, cls_index=cls_index)
    pruned = src.gather(1, importance.gather(1, src).argsort(dim=1)[:, :int(prune_frac * n)])
    return plan._replace(dest=plan.dest.scatter(1, pruned, -1))


@dataclass(frozen=True)
class EViT:
    """EViT (Liang et al. 2022) with the MTR paper's substitution for Mamba.

    Importance = cosine similarity of each token to the cls token (Mamba has no cls attention).
    At ratio r, removed = int(r·M): the removed + 1 least important ("inattentive") tokens are
    fused into ONE token and the other M − removed − 1 are kept (EViT keep rate 1 − (removed+1)/M).
    EViT appends the fused token at the end; a Mamba sequence needs a place for it, so it takes the
    position of the most important of the fused tokens. EViT weights the fusion by the tokens'
    attention; a plan carries no per-token weights, so the fusion is the ``op`` average
    (size-weighted by default) instead.
    """

    op: MergeOp = "wavg"
    r_kind: ClassVar[RKind] = "ratio"
    needs_record: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_options(self)

    def removed(self, m: int, r: float) -> int:
        return ratio_count("EViT", r, m, 1, closed=False)

    def plan(self, signals: Signals, removed: int) -> Plan:
        return fuse_plan(signals.importance("cls"), removed + 1, signals.cls_index)

    def overhead(self, n: int, removed: int, c: int) -> float:
        """Normalisation, one dot product per token with cls, the fused tokens' average."""
        return 6 * n * c + 2 * c * (n - 1) + (removed + 1) * c


@dataclass(frozen=True)
class PuMer:
    """PuMer (Cao et al. 2023) reduced to its modality-aware merging, the part images can use.

    Kept: ToMe bipartite soft matching within one modality — alternate split (A = even, B = odd
    positions), cosine similarity, the int(r·M) best-matched A tokens merged into their B partner
    by a plain mean (PuMer's ``scatter_reduce(mean)``), at most 50 % per point. Dropped: the
    text-informed pruning (it needs text-to-image cross-attention) and text-token merging. The
    metric is the hidden state (Mamba has no attention keys); survivors keep their order.
    """

    op: MergeOp = "mean"
    r_kind: ClassVar[RKind] = "ratio"
    needs_record: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_options(self)

    def removed(self, m: int, r: float) -> int:
        return ratio_count("PuMer", r, m, 0.5, closed=True)

    def plan(self, signals: Signals, removed: int) -> Plan:
        return bipartite_plan(signals.hidden, removed, cls_index=signals.cls_index, cls_rule="sequence")

    def overhead(self, n: int, removed: int, c: int) -> float:
        """The same matching as R-MeeTo's."""
        return bipartite_overhead(n, removed, c)


@dataclass(frozen=True)
class UTR:
    """UTR, unified token reduction (Zhan et al. 2024b, "Rethinking Token Reduction for SSMs").

    Importance = mean over channels of max(0, y) (``score``); the less important half (set A)
    connects to its most similar token of the other half; the int(r·M) most similar connections
    are reduced, a fraction ``q`` of them pruned (the least important A tokens) and the rest
    merged by a plain mean, (a + f)/2 in the paper. Changes forced by Vim and this plug-in: y is
    the mixer output after ``out_proj`` (the recorded signals do not include the SSM output before
    it); UTR merges only on the residual branch, here the residual gets the same hybrid as the
    hidden state (one plan for both, as in the MTR paper's comparison); which connections are
    pruned is our reading (the paper gives only the fraction q).
    """

    q: float = 0.5
    score: Score = "clip"
    op: MergeOp = "mean"
    r_kind: ClassVar[RKind] = "ratio"
    needs_record: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_options(self)
        if not 0 <= self.q <= 1:
            raise ValueError(f"UTR option q (fraction of reduced tokens pruned) must be in [0, 1], got {self.q}")

    def removed(self, m: int, r: float) -> int:
        return ratio_count("UTR", r, m, 0.5, closed=True)

    def plan(self, signals: Signals, removed: int) -> Plan:
        importance = activation_importance(signals.hidden, self.score)
        return classified_plan(importance, signals.hidden, removed, self.q, signals.cls_index)

    def overhead(self, n: int, removed: int, c: int) -> float:
        """The activation score, normalisation, the A × B similarities, the merges."""
        m = n - 1
        return n * c + 6 * n * c + 2 * c * (m // 2) * (m - m // 2) + removed * c


@dataclass(frozen=True)
class HSA:
    """HSA, token pruning with hidden-state alignment (Zhan et al. 2024a, "Exploring Token Pruning
    in Vision State Space Models"), used training-free.

    Importance = max(0, y) aggregated over channels (``score``); the int(r·M) least important
    tokens are dropped and the rest keep their order. The alignment makes the scan skip pruned
    tokens as if they were absent, which on Vim's two 1-D scans is what running the next blocks on
    the ordered survivors does (only the causal conv window differs). Changes: y is the mixer
    output after ``out_proj`` (the SSM output before it is not recorded); no re-training.
    """

    score: Score = "clip"
    op: ClassVar[str] = "wavg"
    r_kind: ClassVar[RKind] = "ratio"
    needs_record: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_options(self)

    def removed(self, m: int, r: float) -> int:
        return ratio_count("HSA", r, m, 1, closed=False)

    def plan(self, signals: Signals, removed: int) -> Plan:
        importance = activation_importance(signals.hidden, self.score)
        return importance_order_plan(importance, removed, cls_index=signals.cls_index)

    def overhead(self, n: int, removed: int, c: int) -> float:
        """The activation score."""
        return n * c


@dataclass(frozen=True)
class RandomDrop:
    """Drop int(r·M) tokens chosen uniformly at random, drawn anew for every image; survivors keep their order.

    The draws come from one generator seeded with ``seed`` when the method is built, so a run (the same
    batches in the same order) is reproducible, while images of different batches get different patterns.
    Report several seeds: a single draw is one sample of a random baseline.
    """

    seed: int = 0
    op: ClassVar[str] = "wavg"
    r_kind: ClassVar[RKind] = "ratio"
    needs_record: ClassVar[bool] = False
    generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(f"random option seed must be an integer, got {self.seed!r}")
        object.__setattr__(self, "generator", torch.Generator().manual_seed(self.seed))

    def removed(self, m: int, r: float) -> int:
        return ratio_count("random drop", r, m, 1, closed=False)

    def plan(self, signals: Signals, removed: int) -> Plan:
        b, m, _ = signals.hidden.shape
        scores = torch.rand(b, m, generator=self.generator).to(signals.hidden.device)
        return importance_order_plan(scores, removed, cls_index=signals.cls_index)

    def overhead(self, n: int, removed: int, c: int) -> float:
        """Nothing is scored."""
        return 0.0
