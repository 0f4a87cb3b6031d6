"""Token reduction for Vision Mamba as a plug-in.

    reducer = rmeeto.reduction.apply(model, "rmeeto", r=11)        # R-MeeTo, blocks 2, 4, …, 22
    rmeeto.reduction.apply(model, "mtr", flops_cut=0.3)            # MTR, ratio solved for −30 % FLOPs
    rmeeto.reduction.remove(model)

Methods are pure plan builders (:mod:`.plans`) combined by one merge function (:mod:`.merge`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from rmeeto.models.deit import ReducibleViT
from rmeeto.models.vim import TokenReducer, VisionMamba
from rmeeto.reduction import vit
from rmeeto.reduction.baselines import HSA, UTR, EViT, PuMer, RandomDrop
from rmeeto.reduction.methods import MTR, BipartiteMerge, Method
from rmeeto.reduction.reducer import Schedule, TokenReduction
from rmeeto.reduction.solver import solve_amount

#: Method name → factory taking the method's options.
METHODS: dict[str, Callable[..., Method]] = {
    "rmeeto": BipartiteMerge,
    "prune": lambda **o: BipartiteMerge(prune=True, **o),
    "tome": lambda **o: BipartiteMerge(order="unordered", **o),
    "shuffle": lambda **o: BipartiteMerge(order="odd_even", **o),
    "mtr": MTR,
    "evit": EViT,
    "pumer": PuMer,
    "utr": UTR,
    "hsa": HSA,
    "random": RandomDrop,
}


def make_method(name: str, **options: Any) -> Method:
    """Build a method by name; an unknown name or option is a ValueError naming it."""
    if name not in METHODS:
        raise ValueError(f"unknown reduction method {name!r}; known: {', '.join(sorted(METHODS))}")
    try:
        return METHODS[name](**options)
    except TypeError as err:
        raise ValueError(f"bad option for method {name!r}: {err}") from err


def apply(model: VisionMamba, method: str = "rmeeto", *, r: float | None = None,
          flops_cut: float | None = None, blocks: Sequence[int] | None = None, interval: int = 2,
          parity: str = "even", final_tokens: int | None = None, track_source: bool = False,
          **options: Any) -> TokenReduction:
    """Attach a reducer to ``model`` (replacing any) and return it.

    r: amount per reduction point (tokens for bipartite methods, a ratio for MTR-style ones), or
    flops_cut: the FLOPs reduction to solve r for. blocks: explicit reduction points, else every
    ``interval`` blocks (``parity`` even: 2, 4, …; odd: 1, 3, …). final_tokens: the last point
    reduces to that many tokens. options: the method's own (see :mod:`.methods`).
    ViT/DeiT: ``placement="in_block"`` (the default of the bipartite methods) merges inside every block
    (or ``blocks``) as the authors ran it, see :mod:`.vit`; ``placement="between"`` as for Vim.
    """
    placement = options.pop("placement", None)
    if isinstance(model, ReducibleViT) and (placement or vit.default_placement(method)) == "in_block":
        return attach(model, vit.in_block_reduction(model, method, r=r, flops_cut=flops_cut, blocks=blocks,
                                                    final_tokens=final_tokens, track_source=track_source,
                                                    **options))
    if placement not in (None, "between"):
        raise ValueError(f"placement={placement!r}: {type(model).__name__} reduces between blocks only ('between')")
    m = make_method(method, **options)
    if (r is None) == (flops_cut is None):
        raise ValueError("give exactly one of r (amount per reduction point) and flops_cut")
    if final_tokens is not None and m.amount_kind != "count":
        raise ValueError(f"final_tokens needs a token-count method; {method!r} takes a ratio")
    depth = len(model.layers)

    def schedule_for(amount: float) -> Schedule:
        if blocks is not None:
            sched = Schedule(tuple(blocks), (amount,) * len(blocks), final_tokens)
        else:
            sched = Schedule.every(depth, amount, interval, parity, final_tokens)
        sched.token_counts(m, model.cfg.num_patches + 1, depth)  # raises if the amount is impossible
        return sched

    amount = solve_amount(model.cfg, m, schedule_for, flops_cut) if flops_cut is not None else r
    return attach(model, TokenReduction(model, m, schedule_for(amount), track_source=track_source))


def attach(model: VisionMamba, reducer: TokenReducer | None) -> TokenReducer | None:
    """Make ``reducer`` (one that :func:`apply` built earlier, or None) the model's reducer, replacing any;
    returns it. Switching between prepared reducers this way skips re-solving their amounts."""
    remove(model)
    model.token_reducer = reducer
    if isinstance(reducer, TokenReduction | vit.InBlockReduction):
        reducer.set_recording(True)
    return reducer


def remove(model: VisionMamba) -> None:
    """Detach the model's reducer, if any."""
    if isinstance(model.token_reducer, TokenReduction | vit.InBlockReduction):
        model.token_reducer.set_recording(False)
    model.token_reducer = None


__all__ = ["METHODS", "Schedule", "TokenReduction", "apply", "attach", "make_method", "remove"]
