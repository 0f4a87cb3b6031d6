"""Forward speed of a model under several token reducers, measured so that the ratios can be trusted.

Reducers are timed round-robin on one batch (the order reversed every other round), after warm-up
rounds, so drift and bursts of load on a shared machine hit every reducer alike. Each round gives one
time per reducer; a reducer's speedup is the median over rounds of (first reducer's time / its time in
the same round), and its spread is the interquartile range of those per-round ratios relative to
their median. A figure is *trusted* when it rests on at least :data:`MIN_REPS` rounds and the ~95 %
interval of its median, ±1.58·IQR/√rounds (the notch of a box plot, McGill et al. 1978), is within
±:data:`MAX_SPREAD`: then repeated runs agree to about that. Rounds are added (up to ``max_reps``) while
some figure is not trusted. Each timing averages as many forwards as fill :data:`MIN_SECONDS`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import rmeeto.reduction as R
from rmeeto.models.mamba import frozen
from rmeeto.models.vim import TokenReducer, TokenState

#: Fewest timed rounds behind a trusted figure.
MIN_REPS = 5
#: Largest relative half-width of the ~95 % interval of a trusted median (runs then agree to about ±10 %).
MAX_SPREAD = 0.10


@dataclass(frozen=True)
class Speed:
    """One reducer's measured speed; spreads are interquartile ranges relative to the median."""

    images_per_s: float
    spread: float
    speedup: float  # over the first reducer measured, median of per-round ratios
    speedup_spread: float
    reps: int

    @property
    def uncertainty(self) -> float:
        """Relative half-width of the ~95 % interval of the medians (img/s and speedup, the larger)."""
        return 1.58 * max(self.spread, self.speedup_spread) / self.reps**0.5

    @property
    def trusted(self) -> bool:
        return self.reps >= MIN_REPS and self.uncertainty <= MAX_SPREAD


def default_speed_batch(device: str | torch.device) -> int:
    """A batch at which compute, not per-op launch overhead, dominates: 128 on a GPU, 32 on a CPU."""
    return 128 if torch.device(device).type == "cuda" else 32


def relative_iqr(values: Sequence[float]) -> float:
    """(Q3 − Q1) / median of ``values``; 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(values)


def summarise(times: Sequence[Sequence[float]], batch_size: int) -> list[Speed]:
    """Per-reducer rounds of forward seconds (reducers × rounds, paired by round) → one :class:`Speed`
    each, speedups against the first reducer."""
    rates = [[batch_size / t for t in row] for row in times]
    speeds = []
    for row, row_rates in zip(times, rates, strict=True):
        ratios = [base / t for base, t in zip(times[0], row, strict=True)]
        speeds.append(Speed(statistics.median(row_rates), relative_iqr(row_rates), statistics.median(ratios),
                            relative_iqr(ratios), len(row)))
    return speeds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: Shortest stretch of repeated forwards behind one timing: single short forwards are mostly timer and
#: scheduler noise (a 0.1 s forward varied by ±20 % from round to round on an idle 2-core machine).
MIN_SECONDS = 0.3


def _timed(run: Callable[[], object], sync: Callable[[], None], min_seconds: float = 0.0) -> float:
    """Seconds per call of ``run``, averaged over as many calls as fill ``min_seconds``."""
    sync()
    start, calls = time.perf_counter(), 0
    while True:
        run()
        calls += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def _timed_forward(model: nn.Module, x: Tensor, min_seconds: float = 0.0) -> float:
    """Seconds per forward of ``model`` on ``x``, averaged over as many forwards as fill ``min_seconds``."""
    return _timed(lambda: model(x), lambda: _sync(x.device), min_seconds)


def interleaved(runs: Sequence[Callable[[], object]], batch_size: int, warmup: int = 2, reps: int = 7,
                max_reps: int | None = None, sync: Callable[[], None] = lambda: None) -> list[Speed]:
    """Speed of each of ``runs`` (a call processes ``batch_size`` images), speedups against ``runs[0]``.

    Rounds go round-robin over the runs, the order reversed every other round; each timing repeats its
    call until :data:`MIN_SECONDS` are filled (``sync`` waits for queued device work). Runs ``warmup``
    untimed rounds, then ``reps`` timed ones, then more (up to ``max_reps``, default ``2 * reps``) while
    any figure is not yet trusted.
    """
    if reps < 1:
        raise ValueError(f"reps must be at least 1, got {reps}")
    max_reps = max(reps, 2 * reps if max_reps is None else max_reps)
    times: list[list[float]] = [[] for _ in runs]
    for i in range(warmup + max_reps):
        order = list(enumerate(runs))
        for k, run in order[::-1] if i % 2 else order:
            seconds = _timed(run, sync, MIN_SECONDS if i >= warmup else 0.0)
            if i >= warmup:
                times[k].append(seconds)
        done = i + 1 - warmup
        if done >= reps and all(s.trusted for s in summarise(times, batch_size)):
            break
    return summarise(times, batch_size)


@torch.no_grad()
def measure(model: nn.Module, reducers: Sequence[TokenReducer | None], x: Tensor, warmup: int = 2,
            reps: int = 7, max_reps: int | None = None) -> list[Speed]:
    """Forward speed of ``model`` on the batch ``x`` (B×…) with each of ``reducers`` attached in turn (None:
    unreduced), speedups against ``reducers[0]``; rounds as in :func:`interleaved`. The model's own reducer
    is restored afterwards."""
    model.eval()

    def forward_with(reducer: TokenReducer | None) -> Callable[[], object]:
        def run() -> object:
            R.attach(model, reducer)
            return model(x)
        return run

    previous = model.token_reducer
    try:
        with frozen(model):
            return interleaved([forward_with(r) for r in reducers], len(x), warmup, reps, max_reps,
                               lambda: _sync(x.device))
    finally:
        R.attach(model, previous)


@torch.no_grad()
def reducer_share(model: nn.Module, x: Tensor, reps: int = 3) -> float:
    """Fraction of the forward's wall time (on ``x``) spent inside the model's token reducer. The reducer is timed
    as a callable between the blocks, so a frozen Vim calls its blocks and merges one at a time here instead of in one
    kernel call (rmeeto.models.frozen_forward), which no timer can look inside."""
    inner, spent = model.token_reducer, [0.0]
    if inner is None:
        return 0.0

    def timed(block: int, state: TokenState) -> TokenState:
        _sync(x.device)
        start = time.perf_counter()
        out = inner(block, state)
        _sync(x.device)
        spent[0] += time.perf_counter() - start
        return out

    timed.inside_blocks = getattr(inner, "inside_blocks", False)  # a ViT calls an in-block reducer inside blocks
    model.token_reducer = timed
    try:
        with frozen(model):
            model(x)  # warm-up
            spent[0], total = 0.0, 0.0
            for _ in range(reps):
                total += _timed_forward(model, x)
    finally:
        model.token_reducer = inner
    return spent[0] / total


def with_reducer(model: nn.Module, reducer: TokenReducer | None, fn: Callable[[], float]) -> float:
    """``fn()`` with ``reducer`` attached to ``model``; the model's own reducer is restored afterwards."""
    previous = model.token_reducer
    R.attach(model, reducer)
    try:
        return fn()
    finally:
        R.attach(model, previous)
