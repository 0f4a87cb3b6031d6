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

    def _record_of(self, name: str) -> tuple[Tensor, Tensor]:
        """Both directions' recorded ``name`` (Δ, B or C), each B×F×L with cls."""
        if self.record is None:
            raise RuntimeError(f"signal {name!r} needs the mixer record; the method must set needs_record")
        return getattr(self.record, name)

    def _recorded(self, name: str) -> tuple[Tensor, Tensor]:
        """Both directions' recorded ``name``, each B×M×F without cls."""
        f, b = self._record_of(name)
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
        if kind in ("delta", "B", "C"):  # the means of all L tokens, then cls removed: the same values, without
            # copying the record's rows first (a fifth of MTR's reducer time on Vim-S, docs/cpu_speed.md, round 19)
            f, b = (x.float() if kind == "delta" else x.float().abs() for x in self._record_of(kind))  # B×F×L
            means = (f.mean(1) + b.mean(1)) / 2
            return remove_cls(means[..., None], self.cls_index)[1][..., 0]
        return torch.cosine_similarity(self.hidden.float(), self.cls.float()[:, None], dim=-1)
