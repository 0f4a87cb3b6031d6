"""Per-token signals a reducer may rank or match tokens by, at one reduction point (cls removed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from rmeeto.models.mamba import ScanRecord
from rmeeto.reduction.merge import remove_cls

Feature = Literal["x", "delta", "B", "C"]
Indicator = Literal["delta", "B", "C", "cls"]


@dataclass
class Signals:
    """hidden: B×M×C mixer output of the previous block; cls: B×C its cls token; cls_index: B positions of
    cls in the full sequence; record: that mixer's Δ/B/C in sequence order with cls at ``cls_index``
    (None unless a method asked for it)."""

    hidden: Tensor
    cls: Tensor
    cls_index: Tensor
    record: ScanRecord | None = None

    def _recorded(self, name: str) -> tuple[Tensor, Tensor]:
        if self.record is None:
            raise RuntimeError(f"signal {name!r} needs the mixer record; the method must set needs_record")
        f, b = getattr(self.record, name)  # each B×F×L
        return (remove_cls(f.transpose(1, 2), self.cls_index)[1],
                remove_cls(b.transpose(1, 2), self.cls_index)[1])

    def features(self, kind: Feature) -> Tensor:
        """B×M×F vectors to match tokens by: the hidden state, or both directions' Δ, B or C."""
        if kind == "x":
            return self.hidden
        return torch.cat(self._recorded(kind), dim=-1)

    def importance(self, kind: Indicator) -> Tensor:
        """B×M token importance. ``delta``: mean Δ over both scan directions and channels (MTR).
        ``B``/``C``: mean magnitude of B or C likewise. ``cls``: cosine similarity to the cls token."""
        if kind == "delta":
            f, b = self._recorded("delta")
            return (f.float().mean(-1) + b.float().mean(-1)) / 2
        if kind in ("B", "C"):
            f, b = self._recorded(kind)
            return (f.float().abs().mean(-1) + b.float().abs().mean(-1)) / 2
        return torch.cosine_similarity(self.hidden.float(), self.cls.float()[:, None], dim=-1)
