"""The ``reduction`` block of a training config as a typed dataclass, so that jsonargparse (LightningCLI) rejects a
misspelt key in YAML like any other key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import rmeeto.reduction
from rmeeto.models import VisionMamba


@dataclass
class Reduction:
    """Keyword arguments of :func:`rmeeto.reduction.apply`: ``method`` with ``r`` (amount per reduction point:
    tokens for bipartite methods, a ratio for MTR-style ones) or ``flops_cut`` (the FLOPs reduction to solve ``r``
    for); ``blocks`` (explicit reduction points) or every ``interval`` blocks of ``parity``; ``final_tokens`` (the
    last point reduces to that many tokens); ``options``: the method's own settings (e.g. ``{"order": "unordered"}``),
    checked by the method when it is built."""

    method: str = "rmeeto"
    r: int | float | None = None
    flops_cut: float | None = None
    blocks: list[int] | None = None
    interval: int = 2
    parity: Literal["even", "odd"] = "even"
    final_tokens: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # jsonargparse may hand a YAML ``r: 8`` over as 8.0 (int | float unions): token counts stay ints.
        if isinstance(self.r, float) and self.r.is_integer():
            self.r = int(self.r)

    def apply(self, model: VisionMamba) -> None:
        """Attach this reduction to ``model`` (ValueError naming the bad value when it cannot be built)."""
        rmeeto.reduction.apply(model, self.method, r=self.r, flops_cut=self.flops_cut, blocks=self.blocks,
                               interval=self.interval, parity=self.parity, final_tokens=self.final_tokens,
                               **self.options)
