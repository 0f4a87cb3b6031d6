"""The random baseline done fairly: several seeds, at equal FLOPs and at MTR's token count.

At equal FLOPs random dropping keeps a few more tokens than MTR, which pays for its matching, so the papers'
claim "MTR beats random" is also checked at equal tokens. One seed is one sample of a random baseline:
every figure here is a mean and a standard deviation over ``seeds``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

from torch import nn

import rmeeto.reduction as R
from rmeeto.evaluate import accuracy
from rmeeto.flops import count

SEEDS = (0, 1, 2, 3, 4)


@dataclass
class RandomRow:
    """Random dropping at one FLOPs cut, matched to ``match`` ("flops": the same cut, "tokens": the tokens
    MTR keeps at that cut): top-1 mean ± std over the seeds, with MTR's top-1 and GFLOPs beside it."""

    cut: float
    match: str
    r: float
    gflops: float
    top1_mean: float
    top1_std: float
    top1_seeds: list[float]
    mtr_top1: float
    mtr_gflops: float


def random_baseline(model: nn.Module, loader_factory: Callable[[], Iterable], num_classes: int,
                    cuts: Sequence[float], seeds: Sequence[int] = SEEDS) -> list[RandomRow]:
    """MTR and random dropping at each of ``cuts``, random over ``seeds`` at equal FLOPs and at equal tokens."""
    rows = []
    for cut in cuts:
        mtr = R.apply(model, "mtr", flops_cut=cut)
        mtr_gflops = count(model)
        mtr_top1 = accuracy(model, loader_factory(), num_classes, desc=f"mtr {cut:.0%}")["top1"]
        settings = {"flops": R.apply(model, "random", flops_cut=cut).schedule.r[0], "tokens": mtr.schedule.r[0]}
        for match, r in settings.items():
            top1s = []
            for seed in seeds:
                R.apply(model, "random", r=r, seed=seed)
                top1s.append(accuracy(model, loader_factory(), num_classes, desc=f"random {match} s{seed}")["top1"])
            rows.append(RandomRow(cut, match, r, count(model), statistics.mean(top1s),
                                  statistics.stdev(top1s) if len(top1s) > 1 else 0.0, top1s, mtr_top1, mtr_gflops))
    R.remove(model)
    return rows


def format_random_rows(rows: Sequence[RandomRow]) -> str:
    """A Markdown table of :func:`random_baseline`'s rows."""
    lines = ["| FLOPs cut | random matched to | r | GFLOPs | random top-1 (mean ± std) | MTR top-1 | MTR GFLOPs |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.cut:.0%} | {'equal FLOPs' if row.match == 'flops' else 'MTR tokens'} | {row.r:.4g} | "
                     f"{row.gflops:.4f} | {row.top1_mean:.2f} ± {row.top1_std:.2f} | {row.mtr_top1:.2f} | "
                     f"{row.mtr_gflops:.4f} |")
    return "\n".join(lines)


def as_dicts(rows: Sequence[RandomRow]) -> list[dict]:
    return [asdict(row) for row in rows]
