"""Attach a reduction method to a model: the callable that sits between blocks, and its schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rmeeto.models.mamba import BiMamba
from rmeeto.models.vim import TokenState
from rmeeto.reduction import merge_cpu
from rmeeto.reduction.merge import Merge, remove_cls, with_cls
from rmeeto.reduction.methods import MTR, BipartiteMerge, Method
from rmeeto.reduction.signals import Signals


@dataclass(frozen=True)
class Schedule:
    """Where and how much: reduction acts before each block in ``blocks`` with the matching entry of ``r``
    (tokens or a ratio, see ``Method.r_kind``); with ``final_tokens`` the last point instead removes
    whatever reaches that many tokens (cls included), as the authors' released Vim-Ti script does."""

    blocks: tuple[int, ...]
    r: tuple[float, ...]
    final_tokens: int | None = None

    def __post_init__(self) -> None:
        if len(self.blocks) != len(self.r):
            raise ValueError(f"{len(self.blocks)} blocks but {len(self.r)} values of r")
        if any(b < 1 for b in self.blocks) or list(self.blocks) != sorted(set(self.blocks)):
            raise ValueError(f"blocks must be increasing and ≥ 1 (before block 0 nothing exists): {self.blocks}")

    @classmethod
    def every(cls, depth: int, r: float | Sequence[float], interval: int = 2, parity: str = "even",
              final_tokens: int | None = None) -> Schedule:
        """Every ``interval`` blocks: even → interval, 2·interval, …; odd → 1, 1 + interval, …"""
        if not 1 <= interval < depth:
            raise ValueError(f"interval must be in [1, {depth - 1}], got {interval}")
        if parity not in ("even", "odd"):
            raise ValueError(f"parity must be 'even' or 'odd', got {parity!r}")
        blocks = tuple(range(interval if parity == "even" else 1, depth, interval))
        return cls(blocks, tuple(r) if isinstance(r, Sequence) else (r,) * len(blocks), final_tokens)

    def removed(self, method: Method, n0: int) -> dict[int, int]:
        """{block: tokens removed just before it} for ``n0`` tokens entering block 0 (cls included);
        ValueError naming the block where the schedule is impossible."""
        out, n = {}, n0
        for block, r in zip(self.blocks, self.r, strict=True):
            if self.final_tokens is not None and block == self.blocks[-1]:
                if not 1 <= self.final_tokens <= n:
                    raise ValueError(f"final_tokens={self.final_tokens} impossible with {n} tokens at block {block}")
                r = n - self.final_tokens
            try:
                out[block] = method.removed(n - 1, r)
            except ValueError as err:
                raise ValueError(f"before block {block} ({n} tokens): {err}") from None
            n -= out[block]
        return out

    def token_counts(self, method: Method, n0: int, depth: int) -> list[tuple[int, int]]:
        """(tokens entering block i, tokens removed just before it) for every block; n counts cls."""
        removed, counts, n = self.removed(method, n0), [], n0
        for i in range(depth):
            n -= removed.get(i, 0)
            counts.append((n, removed.get(i, 0)))
        return counts


class TokenReduction:
    """The model's ``token_reducer``: reduces hidden and residual identically at scheduled blocks
    (hidden only when the state has no residual stream, as in attention models).

    The tokens removed at each point are fixed when it is built (``removed``: {block: count}), so the
    forward pass never asks the device how many tokens are left. Scores and plans are computed in fp32
    with autocast off. ``track_source`` keeps, per output token, a count of the original tokens it holds
    (B×N×N₀).
    """

    def __init__(self, model, method: Method, schedule: Schedule, track_source: bool = False):
        self.method, self.schedule, self.track_source = method, schedule, track_source
        self._mixers = [_recording_mixer(layer) for layer in model.layers]
        if schedule.blocks and schedule.blocks[-1] >= len(self._mixers):
            raise ValueError(f"schedule block {schedule.blocks[-1]} ≥ model depth {len(self._mixers)}")
        self.removed = schedule.removed(method, model.cfg.num_patches + 1)
        self._kernel = isinstance(method, BipartiteMerge | MTR) and method.kernel_merges and not track_source
        silent = [b - 1 for b in schedule.blocks if self._mixers[b - 1] is None]
        if method.needs_record and silent:
            raise ValueError(f"{type(method).__name__} needs the Δ/B/C record of the mixer before each reduction "
                             f"point, but model.layers[{silent[0]}] has no recording mixer (``mixer.record``); "
                             "use a signal of the hidden state (e.g. indicator='cls', metric='x')")

    def __call__(self, block: int, state: TokenState) -> TokenState:
        if block not in self.removed:
            return state
        removed = self.removed[block]
        if self._kernel and removed and merge_cpu.applies(state):  # autocast is off there
            return self._kernel_merge(block, state, removed)
        b, n, _ = state.hidden.shape
        p = state.cls_index
        size = state.size if state.size is not None else state.hidden.new_ones(b, n, dtype=torch.float32)
        if self.track_source and state.source is None:
            state.source = torch.eye(n, device=size.device).expand(b, n, n)
        with torch.autocast(state.hidden.device.type, enabled=False):
            plan = with_cls(self.method.plan(self._signals(block, state), removed), p)
        merge = Merge(plan, size, self.method.op)
        return TokenState(
            hidden=merge(state.hidden),
            residual=merge(state.residual) if state.residual is not None else None,
            cls_index=plan.cls_slot,
            size=merge.sizes(),
            source=merge.sums(state.source) if state.source is not None else None,
        )

    def for_forward(self, like: Tensor) -> Callable[[int, TokenState], TokenState]:
        """This reducer as one forward on tensors like ``like`` calls it: where the merge kernels' conditions that
        hold for a whole forward hold (merge_cpu.forward_applies), a call that checks each state's tensors alone
        (merge_cpu.state_applies) before a kernel merges; else the reducer itself."""
        if not (self._kernel and merge_cpu.forward_applies(like)):
            return self
        removed_at = self.removed

        def call(block: int, state: TokenState) -> TokenState:
            removed = removed_at.get(block)
            if removed is None:
                return state
            if removed and merge_cpu.state_applies(state):
                return self._kernel_merge(block, state, removed)
            return self(block, state)

        return call

    def blocks_kernel_merges(self, like: Tensor) -> dict[int, int] | None:
        """{block: tokens removed before it} where every reduction of a forward on B×N×C tensors like ``like`` (N
        tokens entering block 0) is R-MeeTo's cosine merge as match_merge does it in one kernel call
        (merge_cpu.one_call_merges), so that a kernel running the blocks can make the merges itself
        (rmeeto.models.frozen_forward); else None."""
        method = self.method
        if not (self._kernel and isinstance(method, BipartiteMerge) and merge_cpu.forward_applies(like)):
            return None
        if method.distance != "cosine" or method.kth != 1:
            return None
        b, n, c = like.shape
        for block in sorted(self.removed):
            if self.removed[block] and not merge_cpu.one_call_merges(b, n, c):
                return None
            n -= self.removed[block]
        return {block: r for block, r in self.removed.items() if r}

    def _kernel_merge(self, block: int, state: TokenState, removed: int) -> TokenState:
        """The merge of ``removed`` tokens before ``block`` by merge_cpu's kernels (merge_cpu.applies must hold)."""
        if isinstance(self.method, MTR):
            return merge_cpu.grouped_mean(state, *self.method.groups(self._signals(block, state), removed))
        return merge_cpu.bipartite_wavg(state, removed, self.method.distance, self.method.kth)

    def _signals(self, block: int, state: TokenState) -> Signals:
        """The signals at the reduction point before ``block``: the hidden state without cls, cls, and the record of
        the mixer before it when the method needs one."""
        record = self._mixers[block - 1].last_record if self.method.needs_record else None
        cls_h, hidden = remove_cls(state.hidden, state.cls_index)
        return Signals(hidden, cls_h, state.cls_index, record)

    def set_recording(self, on: bool) -> None:
        """Ask the mixers before each reduction point to keep their Δ/B/C (only if the method needs it)."""
        for mixer in (self._mixers[block - 1] for block in self.schedule.blocks):
            if mixer is None:
                continue
            mixer.record = on and self.method.needs_record
            if not on:
                mixer.last_record = None


def _recording_mixer(layer: object) -> BiMamba | None:
    """The layer's mixer if it can record Δ/B/C (has ``record`` and ``last_record``), else None."""
    mixer = getattr(layer, "mixer", None)
    return mixer if hasattr(mixer, "record") and hasattr(mixer, "last_record") else None
