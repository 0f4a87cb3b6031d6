"""A frozen Vim's blocks, and R-MeeTo's merges between them, as one kernel call (rmeeto.ops.blocks_kernel).

Inside rmeeto.frozen a Vim whose blocks all run as FrozenBlocks (BiMamba.frozen_block), none recording Δ, and whose
token reducer, if any, does only merges that R-MeeTo's one-call kernel can do (its ``blocks_kernel_merges``), runs all
its blocks and merges in one blocks_forward call: the kernels the blocks and merges call one at a time, with the same
arguments, so the same bits, without the Python between them (docs/cpu_speed.md, round 22). The blocks' parameters are
stacked along a first axis, their products' weights packed for each block's row count, once per sequence of row counts
and thread count; the stacks are kept in the cache of the workspace the frozen scope holds (rmeeto.ops.workspace).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from rmeeto.models.mamba import FrozenBlock, Prepared, param_stamp
from rmeeto.ops import packed
from rmeeto.ops.common import wants_grad
from rmeeto.ops.dispatch import cpu_block_inputs
from rmeeto.ops.packed import PackedLinear
from rmeeto.ops.scan_cpu import _NORM_CHUNK, kernel_lock, scan_groups
from rmeeto.ops.workspace import held, reuse

try:
    from rmeeto.ops import blocks_kernel as _k
except ImportError:  # numba missing: there are no FrozenBlocks to run then either
    _k = None

STACKS = 2
"""Stacked layouts kept per frozen scope and model, for its last sequences of row counts (a last partial batch)."""


@dataclass
class _Stack:
    """The blocks' parameters stacked along a first axis as blocks_forward reads them, and what they were made from:
    the mixers' Prepared layouts (kept, so compared by identity) and the norm weights' addresses and versions."""

    prepared: tuple[Prepared, ...]
    norm_stamp: list[int]
    norm_w: np.ndarray  # depth×C
    eps: np.ndarray  # (depth,)
    in_x: np.ndarray  # depth × in_proj's x half packed for the block's rows
    in_z: np.ndarray  # depth × its z half so
    x_proj: np.ndarray  # depth×P × x_proj's weight so, per direction
    out_proj: np.ndarray  # depth × out_proj's weight (the halving in it) so
    taps: np.ndarray  # depth×P×K×Dᵢ, then InnerParams's conv_b, revs (shared), A, D, dt_bias, dt_w, stacked
    conv_b: np.ndarray
    revs: np.ndarray
    A: np.ndarray
    D: np.ndarray
    dt_bias: np.ndarray
    dt_w: np.ndarray


def applies(blocks: Sequence[FrozenBlock | None], state: Any) -> bool:
    """Whether run_blocks can take ``blocks`` and ``state`` (a TokenState): numba, every block a FrozenBlock whose
    mixer records nothing, and the state's hidden (and residual, sizes) fp32, contiguous, on the CPU, without
    gradients, and no source map."""
    for block in blocks:  # a plain loop: see rmeeto.ops.common.wants_grad
        if block is None or block.mixer.record:
            return False
    size = state.size
    return (
        _k is not None
        and state.source is None
        and cpu_block_inputs(state.hidden, state.residual)
        and (size is None or (size.dtype == torch.float32 and size.is_contiguous()))
        and not wants_grad((state.hidden, state.residual, size))
    )


def run_blocks(blocks: Sequence[FrozenBlock], state: Any, removed: dict[int, int],
               reduce: Callable[[int, Any], Any]) -> Any | None:  # fmt: skip
    """``state`` (a TokenState; ``applies``) after all ``blocks``, with ``removed[i]`` tokens merged by R-MeeTo's
    merge before block i: one blocks_forward call; where it leaves a merge to torch (equal maxima at the cut, NaN
    scores), ``reduce(i, state)`` makes that one and another call runs the blocks from i on. A new state; None, with
    nothing run, where the blocks' parameters differ in shape (they cannot be stacked)."""
    nb, n0, nc = state.hidden.shape
    counts = np.zeros(len(blocks), np.int64)
    for i, r in removed.items():
        counts[i] = r
    stack = _stacked(blocks, tuple(nb * int(n) for n in n0 - np.cumsum(counts)))
    if stack is None:
        return None
    ndir, nd, nn = stack.A.shape[1:]
    start = 0
    while True:
        hidden, residual, size = state.hidden, state.residual, state.size
        with kernel_lock as threads, reuse() as workspace:
            groups = scan_groups(threads, nb, nd)
            work = workspace.empty(_k.blocks_work(nb * n0, n0, nc, nd, stack.dt_w.shape[2] + 2 * nn, ndir, nn, groups))
            stop, *out = _k.blocks_forward(
                packed.COMPUTE_ADDRESS, packed.SGEMM_ADDRESS, start, counts, hidden.numpy(),
                (hidden if residual is None else residual).numpy(), residual is not None,
                (hidden.new_ones(nb, hidden.shape[1]) if size is None else size).numpy(), state.cls_index.numpy(),
                stack.norm_w, stack.eps, _NORM_CHUNK, stack.in_x, stack.in_z, stack.x_proj, stack.out_proj, stack.taps,
                stack.conv_b, stack.revs, stack.A, stack.D, stack.dt_bias, stack.dt_w, work.numpy(), groups,
            )  # fmt: skip
        hidden, residual, new_size, cls_index = (torch.from_numpy(a) for a in out)
        merged = size is not None or counts[start + 1 : stop].any()
        state = replace(state, hidden=hidden, residual=residual, size=new_size if merged else None, cls_index=cls_index)
        if stop == len(blocks):
            return state
        state, start = reduce(stop, state), stop  # torch's ranking decides this merge (merge_cpu.bipartite_wavg)


def _stacked(blocks: Sequence[FrozenBlock], rows: tuple[int, ...]) -> _Stack | None:
    """The blocks' stack for products of ``rows[i]`` rows in block i on torch's current thread count: the one kept in
    the held workspace's cache if it was made from the blocks' present parameters, else a new one (kept there, the
    least recently used of more than STACKS for these blocks dropped). None where shapes differ between blocks."""
    prepared = tuple(block.laid_out for block in blocks)
    norm_stamp = param_stamp(tuple(block.weight for block in blocks))
    workspace = held()
    stacks = {} if workspace is None else workspace.cache.setdefault(__name__, {})
    key = (id(blocks[0].mixer), rows, torch.get_num_threads())
    stack = stacks.pop(key, None)
    fresh = stack is not None and stack.norm_stamp == norm_stamp
    if not (fresh and all(a is b for a, b in zip(stack.prepared, prepared, strict=True))):
        stack = _stack(blocks, rows, prepared, norm_stamp)
        if stack is None:
            return None
        mine = [k for k in stacks if k[0] == key[0]]
        for old in mine[: max(0, len(mine) + 1 - STACKS)]:
            del stacks[old]
    stacks[key] = stack
    return stack


def _stack(blocks: Sequence[FrozenBlock], rows: tuple[int, ...], prepared: tuple[Prepared, ...],
           norm_stamp: list[int]) -> _Stack | None:  # fmt: skip
    """A new _Stack of the blocks' parameters (see _stacked)."""
    params = [block.params for block in blocks]
    first = params[0]
    layouts = {(b.weight.shape, b.params.taps.shape, b.params.A.shape, b.params.dt_w.shape, tuple(b.params.revs))
               for b in blocks}  # fmt: skip
    if len(layouts) > 1:  # C, K, Dᵢ, N, R and the directions: the products' shapes follow from them
        return None

    def stacked(name: str) -> np.ndarray:
        return np.stack([getattr(p, name) for p in params])

    return _Stack(
        prepared, norm_stamp, np.stack([block.weight.detach().numpy() for block in blocks]),
        np.array([block.eps for block in blocks], np.float32),
        _packed([[b.laid_out.in_proj[0]] for b in blocks], rows)[:, 0],
        _packed([[b.laid_out.in_proj[1]] for b in blocks], rows)[:, 0],
        _packed([list(p.x_proj) for p in params], rows),
        _packed([[b.laid_out.out_proj] for b in blocks], rows)[:, 0],
        stacked("taps"), stacked("conv_b"), first.revs, stacked("A"), stacked("D"), stacked("dt_bias"),
        stacked("dt_w"),
    )  # fmt: skip


def _packed(linears: list[list[PackedLinear]], rows: tuple[int, ...]) -> np.ndarray:
    """depth×P copies, ``linears[i][p]`` packed for ``rows[i]`` rows, each from a 64-byte line (in place: a packed
    copy must not move)."""
    floats = max(linear.packed_size(r) for per_block, r in zip(linears, rows, strict=True) for linear in per_block)
    out = torch.empty(len(linears), len(linears[0]), -(-floats // 16) * 16).numpy()  # torch's: 64-byte aligned
    for i, (per_block, r) in enumerate(zip(linears, rows, strict=True)):
        for p, linear in enumerate(per_block):
            linear.pack_into(r, out[i, p])
    return out
