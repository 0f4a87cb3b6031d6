"""A frozen Vim's blocks, and R-MeeTo's merges between them, in one numba kernel call (rmeeto.models.frozen_forward).

Each block is mixer_forward (add + RMSNorm, the products on packed copies, conv and scan) and each merge is
match_merge: the kernels a frozen Vim otherwise calls from Python one block and one merge at a time, with the same
arguments, so the same bits. What goes is the Python between them: at batch 1 about 80 µs around each block's
1.3 ms call and some 60 µs around each merge's 90 (merged Vim-S, docs/cpu_speed.md, round 21).

Per block i the parameters come stacked along a first axis (norm_w[i], in_x[i], …); the packed copies in_x, in_z,
x_proj and out_proj are block i's for its own row count (B·Lᵢ: MKL packs for the rows it will multiply).
"""

import numpy as np
from numba import literal_unroll, njit

from .cpu_kernels import _lines, forward_scratch, mixer_forward, mixer_work
from .merge_kernel import match_merge


@njit(inline="always")
def _count(groups, shape):
    """The floats of ``groups`` arrays of ``shape``."""
    n = groups
    for size in shape:
        n *= size
    return n


@njit(inline="always")
def _view(buf, at, groups, shape):
    """(buf[at:] as a groups × shape array, the float after it rounded up to a 64-byte line)."""
    n = _count(groups, shape)
    return buf[at : at + n].reshape((groups,) + shape), at + _lines(n)


@njit(inline="always")
def _scan_scratch(buf, groups, nl, nn):
    """scan_forward's scratch (forward_scratch's arrays xs, dt, dtu, ys, h, ps, for ``groups`` groups and L = nl) as
    views of buf, each from a 64-byte line."""
    xs_shape, dt_shape, dtu_shape, ys_shape, h_shape, ps_shape = forward_scratch(nl, nn)
    xs, at = _view(buf, 0, groups, xs_shape)
    dt, at = _view(buf, at, groups, dt_shape)
    dtu, at = _view(buf, at, groups, dtu_shape)
    ys, at = _view(buf, at, groups, ys_shape)
    h, at = _view(buf, at, groups, h_shape)
    ps, _ = _view(buf, at, groups, ps_shape)
    return xs, dt, dtu, ys, h, ps


@njit(cache=True)
def blocks_work(rows, nl, nc, nd, nf, ndir, nn, groups):
    """The floats blocks_forward's ``work`` takes for blocks of at most B·L = rows (L = nl tokens), C = nc,
    Dᵢ = nd, R+2N = nf, P = ndir directions, N = nn states and ``groups`` scan groups."""
    total = mixer_work(rows, nc, nd, nf, ndir)
    for shape in literal_unroll(forward_scratch(nl, nn)):
        total += _lines(_count(groups, shape))
    return total


@njit(inline="always")
def _empty_lines(nb, nl, nc):
    """An uninitialised B×L×C float32 array from a 64-byte line, as torch allocates (numba's own start 32 bytes past
    one as often as not, and the block kernels' vector rows would then span two lines)."""
    size = nb * nl * nc
    buf = np.empty(size + 16, np.float32)
    at = (16 - buf.ctypes.data // 4 % 16) % 16
    return buf[at : at + size].reshape((nb, nl, nc))


@njit(fastmath=False, error_model="numpy", cache=True)
def blocks_forward(gemm, sgemm, start, removed, hidden, residual, has_residual, size, cls_index, norm_w, eps, chunk,
                   in_x, in_z, x_proj, out_proj, taps, conv_b, revs, A, Dv, bias, dt_w, work, groups):  # fmt: skip
    """Blocks start, start + 1, … of a frozen Vim on hidden (B×L×C) and residual (read only with has_residual), with
    R-MeeTo's merge of removed[i] tokens (match_merge: hidden, residual, size B×L and cls_index (B,)) before each
    block i > start where removed[i] > 0. Returns (the block it stopped before, hidden, residual, size, cls_index
    there): the last block + 1, or a block whose merge match_merge leaves to torch (equal maxima at the cut, NaN
    scores); new arrays, the inputs are not written.

    Per block i: norm_w[i] (C,) and eps[i] its RMSNorm's; in_x[i], in_z[i], x_proj[i] (P × a copy) and out_proj[i]
    packed for its B·Lᵢ rows; taps[i], conv_b[i], A[i], Dv[i], bias[i], dt_w[i] as mixer_forward takes them; revs
    the directions'. work (1-d, blocks_work's floats for the first block's tokens, 64-byte aligned): mixer_forward's
    intermediates, then scan_forward's scratch for ``groups`` groups. gemm, sgemm: rmeeto.ops.packed's
    COMPUTE_ADDRESS and SGEMM_ADDRESS."""
    depth = norm_w.shape[0]
    nb, nl, nc = hidden.shape
    ndir, nd, nn = A.shape[1:]
    scratch = work[mixer_work(nb * nl, nc, nd, dt_w.shape[2] + 2 * nn, ndir) :]
    out, summed = _empty_lines(nb, nl, nc), _empty_lines(nb, nl, nc)
    for i in range(start, depth):
        r = removed[i]
        if i > start and r > 0:
            k1 = out.shape[1] - r
            merged, merged_sum = _empty_lines(nb, k1, nc), _empty_lines(nb, k1, nc)
            merged_size, cls_slot = np.empty((nb, k1), np.float32), np.empty(nb, np.int64)
            if not match_merge(sgemm, out, summed, size, cls_index, r, merged, merged_sum, merged_size, cls_slot):
                return i, out, summed, size, cls_index
            out, summed, size, cls_index = merged, merged_sum, merged_size, cls_slot
        # the first block reads the inputs; each next one its own outputs, in place (add_rms_norm reads each row of
        # hidden and residual before it writes the sum there, and hidden is not read after it)
        first = i == start
        xs, dt, dtu, ys, h, ps = _scan_scratch(scratch, groups, out.shape[1], nn)
        mixer_forward(gemm, True, hidden if first else out, residual if first else summed, has_residual or not first,
                      norm_w[i], eps[i], chunk, summed, in_x[i], in_z[i], x_proj[i], out_proj[i], taps[i], conv_b[i],
                      revs, A[i], Dv[i], bias[i], dt_w[i], work, np.zeros(1, np.int64), xs, dt, dtu, ys, h, ps,
                      out)  # fmt: skip
    return depth, out, summed, size, cls_index
