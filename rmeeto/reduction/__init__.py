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
from rmeeto.models.generic import Reducible
from rmeeto.models.vim import TokenReducer
from rmeeto.reduction import vit
from rmeeto.reduction.baselines import HSA, UTR, EViT, PuMer, RandomDrop
from rmeeto.reduction.methods import MTR, BipartiteMerge, Method
from rmeeto.reduction.reducer import Schedule, TokenReduction
from rmeeto.reduction.solver import largest_r, solve_r

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


def apply(model: Reducible, method: str = "rmeeto", *, r: float | None = None, flops_cut: float | None = None,
          blocks: Sequence[int] | None = None, interval: int = 2, parity: str = "even",
          final_tokens: int | None = None, track_source: bool = False,
          **options: Any) -> TokenReduction | vit.InBlockReduction:
    """Attach a reducer to ``model`` (replacing any) and return it.

    r: the setting per reduction point (tokens for bipartite methods, a ratio of the current tokens for
    MTR-style ones), or flops_cut: the FLOPs reduction to solve r for. blocks: explicit reduction points,
    else every ``interval`` blocks (``parity`` even: 2, 4, …; odd: 1, 3, …). final_tokens: the last point
    reduces to that many tokens. options: the method's own (see :mod:`.methods`, :mod:`.baselines`).
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
        raise ValueError("give exactly one of r (setting per reduction point) and flops_cut")
    if final_tokens is not None and m.r_kind != "count":
        raise ValueError(f"final_tokens needs a token-count method; {method!r} takes a ratio")
    depth, n0 = len(model.layers), model.cfg.num_patches + 1

    def schedule_for(value: float) -> Schedule:
        if blocks is not None:
            return Schedule(tuple(blocks), (value,) * len(blocks), final_tokens)
        return Schedule.every(depth, value, interval, parity, final_tokens)

    if flops_cut is not None:
        r = solve_r(model.cfg, m, schedule_for, flops_cut)
    schedule = schedule_for(r)
    try:
        schedule.removed(m, n0)
    except ValueError as err:
        best = largest_r(m, schedule_for, n0, int(r)) if m.r_kind == "count" and r == int(r) else None
        hint = f"; the largest r this schedule allows is {best}" if best is not None else ""
        raise ValueError(f"{method} r={r} is impossible on this model ({n0} tokens, blocks "
                         f"{list(schedule.blocks)}): {err}{hint}") from None
    return attach(model, TokenReduction(model, m, schedule, track_source=track_source))


def attach(model: Reducible, reducer: TokenReducer | None) -> TokenReducer | None:
    """Make ``reducer`` (one that :func:`apply` built earlier, or None) the model's reducer, replacing any;
    returns it. Switching between prepared reducers this way skips re-solving their r."""
    remove(model)
    model.token_reducer = reducer
    if isinstance(reducer, TokenReduction | vit.InBlockReduction):
        reducer.set_recording(True)
    return reducer


def remove(model: Reducible) -> None:
    """Detach the model's reducer, if any."""
    if isinstance(model.token_reducer, TokenReduction | vit.InBlockReduction):
        model.token_reducer.set_recording(False)
    model.token_reducer = None


__all__ = ["METHODS", "Schedule", "TokenReduction", "apply", "attach", "make_method", "remove"]
