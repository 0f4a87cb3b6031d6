"""R-MeeTo's and MTR's merges at inference on the `cpu` backend.

R-MeeTo's: one numba kernel call (rmeeto.ops.merge_kernel.match_merge) lays out the normalised A and B
tokens, scores them by MKL's SGEMM and ranks and merges, where its norms and products are torch's to the bit
(kernel_norms, kernel_scores: checked at run time) and no equal maxima at the cut (or NaN scores) leave the ranking
to torch's max and argsort, whose choice there a kernel cannot know. Elsewhere the same kernels run around torch's
norms, scores or ranking.

The general path (a plan, then :class:`~rmeeto.reduction.merge.Merge` per stream) runs some 80–100 tensor
operations per merge and passes over the B×N×C streams about eight times; inside a Vim those operations
cost several µs each, so the reducer was 10.5 % of a merged Vim-S forward at batch 1 and 5.5 % at batch 8
(docs/cpu_speed.md, round 6). Same tokens merged and the same numbers to the bit as the general path: a
token's norm does not depend on where its row lies, and the kernels divide and sum as the tensor operations do.

MTR's: its grouping by tensor operations (rmeeto.reduction.plans.mtr_groups: every decision torch's), then the
plan and the mean merge of both streams in one kernel instead of some 40 tensor operations (MTR's 11 reductions
in a frozen Vim-S forward at batch 8: 24 → 19 ms, docs/cpu_speed.md, round 19). The same numbers to the bit.
"""

from __future__ import annotations

import numpy as np
import torch

from rmeeto.models.vim import TokenState
from rmeeto.ops.common import wants_grad
from rmeeto.ops.dispatch import resolve_backend
from rmeeto.ops.packed import SGEMM_ADDRESS
from rmeeto.ops.scan_cpu import kernel_lock
from rmeeto.reduction.plans import rank_matches, unit_scores

try:
    from rmeeto.ops import merge_kernel as _k
except ImportError:  # numba missing or broken: the general path is used
    _k = None

_NO_SCORES = np.empty((0, 0, 0), np.float32)
"""bipartite_wavg's scores when it is given the matching."""
_NO_NORMS = np.empty((0, 0), np.float32)
"""unit_halves's norms when it makes them itself."""
_EXACT_NORMS: dict[int, bool] = {}


def kernel_norms(channels: int) -> bool:
    """Whether merge_kernel's _norm gives torch.linalg.vector_norm's fp32 results to the bit for rows of ``channels``
    values with this torch on this machine (its order of additions is inferred, so it is checked): then unit_halves
    makes the norms itself, else it takes torch's (a call more, ~30 µs a merge at batch 1 in merged Vim-S,
    docs/cpu_speed.md, round 20). Tried once per channel count, on 256 rows of scales from 1e-3 to 1e3."""
    if channels not in _EXACT_NORMS:
        rows = torch.randn(256, channels, generator=torch.Generator().manual_seed(0))
        rows *= torch.logspace(-3, 3, 256).unsqueeze(1)
        got = torch.empty(256)
        with kernel_lock:
            _k.row_norms(rows.numpy(), got.numpy())
        _EXACT_NORMS[channels] = torch.equal(got, torch.linalg.vector_norm(rows, dim=-1))
    return _EXACT_NORMS[channels]


_EXACT_PRODUCTS: dict[tuple[int, ...], bool] = {}


def kernel_scores(b: int, na: int, nb: int, c: int) -> bool:
    """Whether match_merge's scores (MKL's SGEMM called from the kernel) are torch.bmm's to the bit for B×Na×C and
    B×Nb×C unit vectors on torch's current thread count: then one kernel call does a whole cosine merge (~60 µs a
    merge fewer in merged Vim-S at batch 1, docs/cpu_speed.md, round 20), else bmm makes the scores. torch calls the
    same SGEMM for products of Vim's sizes, but multiplies small ones itself (and a torch without MKL has no SGEMM to
    call), so this is tried once per shape and thread count, on random unit vectors: at least 4,096 scores (or 64
    tries), as two ways of summing a short product often agree."""
    key = (b, na, nb, c, torch.get_num_threads())
    if key not in _EXACT_PRODUCTS:
        scores = b * na * nb
        g, tries = torch.Generator().manual_seed(0), min(64, -(-4096 // scores)) if SGEMM_ADDRESS and scores else 0
        _EXACT_PRODUCTS[key] = tries > 0
        for _ in range(tries):
            a, b_set = torch.randn(b, na, c, generator=g), torch.randn(b, nb, c, generator=g)
            a, b_set = a / a.norm(dim=-1, keepdim=True), b_set / b_set.norm(dim=-1, keepdim=True)
            got = torch.empty(b, na, nb)
            with kernel_lock:
                _k.products(SGEMM_ADDRESS, a.numpy(), b_set.numpy(), got.numpy())
            if not torch.equal(got, unit_scores(a, b_set)):
                _EXACT_PRODUCTS[key] = False
                break
    return _EXACT_PRODUCTS[key]


def one_call_merges(b: int, n: int, c: int) -> bool:
    """Whether match_merge can do R-MeeTo's cosine merge of B×N×C tokens (cls among them) in one call, its norms and
    scores torch's to the bit (kernel_norms, kernel_scores)."""
    return kernel_norms(c) and kernel_scores(b, n // 2, (n - 1) // 2, c)


def applies(state: TokenState) -> bool:
    """The kernel can merge this state: numba, the `cpu` backend, fp32 hidden and residual streams (and sizes),
    autocast off (so the matching's tensor operations run in fp32 without a context to turn it off, which cost
    ~25 µs a merge at batch 1), no gradients wanted, no source map tracked."""
    return forward_applies(state.hidden) and state_applies(state)


def forward_applies(like: torch.Tensor) -> bool:
    """What of ``applies`` holds for a whole forward on tensors like ``like``: numba, autocast off, the `cpu` backend
    for them. Asked once a forward by TokenReduction.for_forward instead of at each merge (~20 µs a merge at batch 1
    in merged Vim-S on cold caches, docs/cpu_speed.md, round 20)."""
    return _k is not None and like.is_cpu and not torch.is_autocast_enabled("cpu") and resolve_backend(like) == "cpu"


def state_applies(state: TokenState) -> bool:
    """The rest of ``applies``, for this state's tensors: CPU, fp32 streams (and sizes), a residual stream, no source
    map, no gradients wanted."""
    hidden, residual, size = state.hidden, state.residual, state.size
    return (  # plain tests, no generator: a merge at batch 1 makes them on cold caches (docs/cpu_speed.md, round 16)
        residual is not None
        and state.source is None
        and hidden.is_cpu
        and hidden.dtype == residual.dtype == torch.float32
        and (size is None or size.dtype == torch.float32)
        and not wants_grad((hidden, residual, size))
    )


def _kernel_io(state: TokenState, hidden: torch.Tensor, k1: int) -> tuple[tuple, tuple, TokenState]:
    """What the merge kernels read and write for ``state`` (``hidden``: its hidden stream, contiguous) merged into
    K + 1 = k1 slots: the streams (hidden, residual, sizes, ones where the state has none, cls positions) and the
    outputs (the same, K + 1 each) as arrays, and the TokenState the outputs make up."""
    b, n, c = hidden.shape
    residual = state.residual.contiguous()
    size = hidden.new_ones(b, n) if state.size is None else state.size.contiguous()
    out = TokenState(hidden.new_empty(b, k1, c), residual.new_empty(b, k1, c), torch.empty(b, dtype=torch.long),
                     size.new_empty(b, k1))  # fmt: skip
    streams = (hidden.numpy(), residual.numpy(), size.numpy(), state.cls_index.numpy())
    return streams, (out.hidden.numpy(), out.residual.numpy(), out.size.numpy(), out.cls_index.numpy()), out


@torch.compiler.disable  # numba cannot be traced (see rmeeto.ops.scan_cpu)
def bipartite_wavg(state: TokenState, removed: int, distance: str = "cosine", kth: int = 1) -> TokenState:
    """R-MeeTo's ordered bipartite merge of ``removed`` ≥ 1 tokens with the size-weighted average, as
    BipartiteMerge(metric="x", order="ordered", op="wavg") and Merge do it (``applies`` must hold)."""
    hidden = state.hidden.contiguous()
    b, n, c = hidden.shape
    if removed > n // 2:  # the reducer's schedule rules this out; the kernels would index past their arrays
        raise ValueError(f"R-MeeTo cannot merge {removed} of {n} tokens: at most {n // 2}, the number of A tokens")
    na, nb = n // 2, (n - 1) // 2  # the N − 1 others split into A and B tokens
    streams, outputs, out = _kernel_io(state, hidden, n - removed)
    one_call = distance == "cosine" and kth == 1 and one_call_merges(b, n, c)
    if one_call:
        with kernel_lock:
            if _k.match_merge(SGEMM_ADDRESS, *streams, removed, *outputs):
                return out
    # torch's norms or scores where the kernel's are not torch's, and torch's ranking where equal maxima (or the k-th
    # match) leave it to torch's sort
    a, b_set = hidden.new_empty(b, na, c), hidden.new_empty(b, nb, c)
    norms = _NO_NORMS if kernel_norms(c) else torch.linalg.vector_norm(hidden, dim=-1).numpy()
    with kernel_lock:
        _k.unit_halves(hidden.numpy(), norms, state.cls_index.numpy(), a.numpy(), b_set.numpy())
    scores = unit_scores(a, b_set, distance)
    if kth == 1 and not one_call:  # the kernel ranks unless torch's sort must decide (match_merge found it must)
        index = np.empty((b, na), np.int64)
        with kernel_lock:
            if _k.bipartite_wavg(*streams, scores.numpy(), index, np.empty_like(index), removed, *outputs):
                return out
    node_idx, edge_idx = rank_matches(scores, kth)
    with kernel_lock:
        _k.bipartite_wavg(*streams, _NO_SCORES, node_idx.numpy(), edge_idx.numpy(), removed, *outputs)
    return out


@torch.compiler.disable
def grouped_mean(state: TokenState, source: torch.Tensor, joins: torch.Tensor) -> TokenState:
    """MTR's merge (MTR(variant="merge", order="ordered", op="mean") after its grouping) of the tokens ``source``
    names (B×n indices among the N − 1 non-cls tokens, as mtr_groups gives them) into the ones ``joins`` names,
    as grouped_plan, with_cls and Merge do it (``applies`` must hold)."""
    hidden = state.hidden.contiguous()
    streams, outputs, out = _kernel_io(state, hidden, hidden.shape[1] - source.shape[1])
    with kernel_lock:
        _k.grouped_mean(*streams, source.contiguous().numpy(), joins.contiguous().numpy(), *outputs)
    return out
