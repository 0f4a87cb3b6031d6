"""Numba kernels for R-MeeTo's and MTR's merges at inference (see rmeeto.reduction.merge_cpu, which calls them).

unit_halves lays out the matching's input, the A and B tokens divided by their norms (torch's, or made as torch
makes them: _norm); bipartite_wavg ranks the matches from the scores (unless equal maxima leave that to torch's
sort), then does the plan's slot arithmetic and the size-weighted average of both streams in one call: what
bipartite_match, bipartite_plan's ordered layout, with_cls and Merge("wavg") do with tensor operations after the
scores. match_merge does both around the scores, made by the SGEMM torch's bmm calls (_products): a whole cosine
merge in one call. grouped_mean does the same for MTR's grouping (made by tensor operations) and Merge("mean").
They do the same float32 operations in the same order as those (a division per element; each slot sums its tokens
in token order, starting from zero, then divides by its summed size, or for the mean by its count), so the results
are the same to the bit.
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

SLOTS_PER_TASK = 16
"""Output slots per parallel task of the averaging phase."""


@intrinsic
def _squares8(typingctx, row):
    """The sum of the squares of row[:C − C mod 8] (row: 1-d contiguous float32, C values) as eight float32 lanes,
    each square rounded before its addition, added lane by lane in lane order: an 8-float vector accumulated in a
    register (numba would not vectorise the eight partial sums without reassociating them)."""
    if row != types.Array(types.float32, 1, "C"):
        return None

    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        vty = ir.VectorType(ir.FloatType(), 8)
        acc = cgutils.alloca_once_value(builder, ir.Constant(vty, [0.0] * 8))  # promoted to a register by LLVM
        chunks = builder.sdiv(builder.extract_value(ary.shape, 0), ir.Constant(cgutils.intp_t, 8))
        with cgutils.for_range(builder, chunks) as loop:
            at = builder.gep(ary.data, [builder.mul(loop.index, ir.Constant(cgutils.intp_t, 8))])
            v = builder.load(builder.bitcast(at, vty.as_pointer()), align=4)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(v, v)), acc)
        lanes = builder.load(acc)
        total = builder.extract_element(lanes, ir.Constant(ir.IntType(32), 0))
        for j in range(1, 8):
            total = builder.fadd(total, builder.extract_element(lanes, ir.Constant(ir.IntType(32), j)))
        return total

    return types.float32(row), codegen


@njit(inline="always")
def _norm(row):
    """The L2 norm of ``row`` (C fp32) as torch.linalg.vector_norm's CPU kernel makes it over a last dim on this
    machine (found by trial; merge_cpu.kernel_norms checks it at run time): _squares8's eight partial sums added
    in lane order, then the C mod 8 last squares in order, then the root."""
    total = _squares8(row)
    for k in range(row.shape[0] - row.shape[0] % 8, row.shape[0]):
        total += row[k] * row[k]
    return np.sqrt(total)


@intrinsic
def _products(typingctx, sgemm, a, b, out):
    """out[i] (Na×Nb) = a[i] (Na×C) @ b[i] (Nb×C)ᵀ for each i < B, by MKL's SGEMM at address ``sgemm`` (the Fortran
    interface: column-major, arguments by reference) called as torch's CPU bmm calls it for a @ b.transpose(1, 2):
    SGEMM("T", "N", Nb, Na, C, 1, b[i], C, a[i], C, 0, out[i], Nb). All three C-contiguous float32 3-d arrays; no
    checks. The address comes in as an argument so that the kernel can be cached on disk."""
    f32_3d = types.Array(types.float32, 3, "C")
    if a != f32_3d or b != f32_3d or out != f32_3d:
        return None
    i8, i32, f32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
    ptr = i8.as_pointer()

    def codegen(context, builder, signature, args):
        call = builder.inttoptr(args[0], ir.FunctionType(ir.VoidType(), [ptr] * 13).as_pointer())
        arys = [context.make_array(t)(context, builder, v) for t, v in zip(signature.args[1:], args[1:], strict=True)]
        (batch, na, nc), (_, nb, _) = (cgutils.unpack_tuple(builder, ary.shape, 3) for ary in arys[:2])

        def ref(value):  # a pointer to a stack copy of value
            slot = cgutils.alloca_once(builder, value.type)
            builder.store(value, slot)
            return builder.bitcast(slot, ptr)

        m, n, k = (ref(builder.trunc(v, i32)) for v in (nb, na, nc))
        trans, plain = ref(ir.Constant(i8, ord("T"))), ref(ir.Constant(i8, ord("N")))
        one, zero = ref(ir.Constant(f32, 1.0)), ref(ir.Constant(f32, 0.0))
        with cgutils.for_range(builder, batch) as loop:
            def matrix(ary, rows, cols):  # &ary[i] as a byte pointer
                at = builder.gep(ary.data, [builder.mul(loop.index, builder.mul(rows, cols))])
                return builder.bitcast(at, ptr)

            a_i, b_i, out_i = matrix(arys[0], na, nc), matrix(arys[1], nb, nc), matrix(arys[2], na, nb)
            builder.call(call, [trans, plain, m, n, k, one, b_i, k, a_i, k, zero, out_i, m])
        return context.get_dummy_value()

    return types.void(types.intp, a, b, out), codegen


@njit(fastmath=False, error_model="numpy", cache=True)
def products(sgemm, a, b, out):
    """_products, as merge_cpu.kernel_scores compares it with torch.bmm."""
    _products(sgemm, a, b, out)


@njit(fastmath=False, error_model="numpy", cache=True)
def match_merge(sgemm, hidden, residual, size, cls_index, removed, out_hidden, out_residual, out_size, cls_slot):
    """R-MeeTo's cosine merge in one call: unit_halves (the kernel's norms), their scores a @ bᵀ by MKL's SGEMM at
    address ``sgemm``, then bipartite_wavg with them (its arguments but the scratch, and its result). The A and B
    rows, the B×Na×Nb scores and the matching are made here: five arrays fewer for the caller to make and hand
    over (~10 µs a merge at batch 1, docs/cpu_speed.md, round 21)."""
    nb, n, c = hidden.shape
    na, nbt = n // 2, (n - 1) // 2
    a, b = np.empty((nb, na, c), np.float32), np.empty((nb, nbt, c), np.float32)
    scores = np.empty((nb, na, nbt), np.float32)
    unit_halves(hidden, np.empty((0, 0), np.float32), cls_index, a, b)
    _products(sgemm, a, b, scores)
    node_idx = np.empty((nb, na), np.int64)
    return bipartite_wavg(hidden, residual, size, cls_index, scores, node_idx, np.empty_like(node_idx), removed,
                          out_hidden, out_residual, out_size, cls_slot)  # fmt: skip


@njit(fastmath=False, error_model="numpy", cache=True)
def row_norms(rows, out):
    """out (R) = _norm of each of rows (R×C): what merge_cpu.kernel_norms compares with torch's."""
    for i in range(rows.shape[0]):
        out[i] = _norm(rows[i])


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def unit_halves(hidden, norms, cls_index, a, b):
    """a (B×Na×C) = the A tokens of hidden (B×N×C; the even places among the N − 1 non-cls tokens, cls at
    cls_index), each divided by its norm; b (B×Nb×C) = the B tokens (odd places) likewise. The norms come from
    ``norms`` (B×N), or from _norm where that is 0×0. Rows in parallel."""
    nb, n, c = hidden.shape
    for task in prange(nb * (n - 1)):
        i, j = task // (n - 1), task % (n - 1)
        t = j + 1 if j >= cls_index[i] else j
        out = a[i, j // 2] if j % 2 == 0 else b[i, j // 2]
        row = hidden[i, t]
        norm = _norm(row) if norms.shape[0] == 0 else norms[i, t]
        for ch in range(c):
            out[ch] = row[ch] / norm


@njit(inline="always")
def _slots(n, p, r, node_idx, src, dest):
    """One image's plan: dest[t] = output slot of token t (N tokens, cls at p) → the cls token's slot.

    The A tokens (even positions among the N − 1 others) listed first in src (r of them) join the B token
    node_idx names (odd positions); the others survive in order; cls goes to int(p·(N − r)/N) and the slots
    at or after it move up by one.
    """
    m = n - 1
    merged = np.zeros(m, np.bool_)
    for i in range(r):
        merged[2 * src[i]] = True
    slot = np.empty(m, np.int64)
    s = 0
    for j in range(m):
        if not merged[j]:
            slot[j] = s
            s += 1
    q = p * (n - r) // n
    for t in range(n):
        if t == p:
            dest[t] = q
            continue
        j = t - 1 if t > p else t
        d = slot[2 * node_idx[j // 2] + 1] if merged[j] else slot[j]
        dest[t] = d + 1 if d >= q else d
    return q


@njit(inline="always")
def _group(dest, k1, first, tokens):
    """Counting sort of the tokens by slot: the tokens of slot s are tokens[first[s]:first[s + 1]], in token
    order (first: K + 2 offsets)."""
    first[:] = 0
    for t in range(dest.shape[0]):
        first[dest[t] + 1] += 1
    for s in range(k1):
        first[s + 1] += first[s]
    fill = first[:k1].copy()
    for t in range(dest.shape[0]):
        tokens[fill[dest[t]]] = t
        fill[dest[t]] += 1


@njit(inline="always")
def _wavg_row(x, tokens, lo, hi, size, weighted, total, out):
    """out (C) = Σ x[t]·w[t] over tokens[lo:hi], from zero in token order, / total; w = size when weighted, else
    ones (x·1 is x)."""
    for i in range(lo, hi):
        t = tokens[i]
        row, w = x[t], size[t] if weighted else np.float32(1.0)
        if i == lo:
            for j in range(out.shape[0]):
                out[j] = np.float32(0.0) + row[j] * w
        else:
            for j in range(out.shape[0]):
                out[j] += row[j] * w
    for j in range(out.shape[0]):
        out[j] /= total


@njit(inline="always")
def _rank(scores, removed, node_idx, src):
    """One image's matching from its Na×Nb scores, as torch's max and argsort make it: node_idx (Na) = each
    row's first maximal column; src (Na) starts with the ``removed`` rows of the highest maxima → False, with
    node_idx and src not all written, when a score is NaN, the removed-th and next highest maxima are equal, or
    there are no columns (``removed`` ≤ Na).

    Only which rows come first counts (the merge sums each slot's tokens in token order), and with the
    maxima on either side of that cut unequal, any sort puts the same rows there; at an equal pair the choice
    is torch's unstable sort's to make (docs/cpu_speed.md, round 17)."""
    na, nb = scores.shape
    if nb == 0:  # no B token to match: torch's max raises the error
        return False
    best = np.empty(na, np.float32)
    for i in range(na):
        row = scores[i]
        m, k = row[0], 0
        for j in range(nb):
            v = row[j]
            if v != v:
                return False
            if v > m:
                m, k = v, j
        best[i], node_idx[i] = m, k
    order = np.argsort(best)  # ascending: the removed rows of the highest maxima are its last ones
    if removed < na and best[order[na - removed]] == best[order[na - removed - 1]]:
        return False
    for i in range(removed):
        src[i] = order[na - 1 - i]
    return True


@njit(fastmath=False, error_model="numpy", cache=True)
def _plan(cls_index, node_idx, edge_idx, removed, cls_slot, first, tokens):
    """bipartite_wavg's serial part, image by image (O(N) each): each token's slot and the tokens of each slot
    (_slots, _group) into first (B×(K+2)) and tokens (B×N). A function of its own, compiled without ``parallel``:
    inside the parallel kernel numba made each image's np.zeros, slice fill and copy a parallel region of its
    own, three per image (the kernel took 383 µs a merge at the demo's batch 64 so, 128 µs with this and the
    ranking over the images in parallel; docs/cpu_speed.md, round 18)."""
    nb, n = tokens.shape
    k1 = first.shape[1] - 1
    dest = np.empty(n, np.int64)
    for b in range(nb):
        cls_slot[b] = _slots(n, cls_index[b], removed, node_idx[b], edge_idx[b], dest)
        _group(dest, k1, first[b], tokens[b])


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def bipartite_wavg(hidden, residual, size, cls_index, scores, node_idx, edge_idx, removed, out_hidden, out_residual,
                   out_size, cls_slot):  # fmt: skip
    """Merge B×N×C hidden and residual streams (B×N sizes, cls at cls_index) into K + 1 slots: the A tokens in
    the first ``removed`` columns of edge_idx (B×Na, by A index) join the B token node_idx names (B×Na); out_*
    B×(K+1)×C and B×(K+1); cls_slot (B) gets cls's new position. With B×Na×Nb ``scores`` (else a 0×0×0
    array) the kernel makes node_idx and edge_idx's first ``removed`` columns from them first (_rank) and
    returns False, merging nothing, where that is torch's to decide; True when merged. All float32
    contiguous but the int64 indices; no bounds checks."""
    nb, n = size.shape
    k1 = out_size.shape[1]
    if scores.shape[0]:
        ranked = np.empty(nb, np.bool_)
        for b in prange(nb):  # O(Na·Nb) each: the images in parallel
            ranked[b] = _rank(scores[b], removed, node_idx[b], edge_idx[b])
        for b in range(nb):
            if not ranked[b]:
                return False
    first = np.empty((nb, k1 + 1), np.int64)
    tokens = np.empty((nb, n), np.int64)
    _plan(cls_index, node_idx, edge_idx, removed, cls_slot, first, tokens)
    _average(hidden, residual, size, True, first, tokens, out_hidden, out_residual, out_size)
    return True


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def _average(hidden, residual, size, weighted, first, tokens, out_hidden, out_residual, out_size):
    """Merge's sums and divisions for both streams: each slot s of image b, its tokens tokens[b, first[b, s]:first[b,
    s + 1]] in token order, averaged weighted by their sizes (weighted: "wavg") or not ("mean"); out_size[b, s]
    their summed size. Slots in parallel, SLOTS_PER_TASK a task."""
    nb, k1 = out_size.shape
    chunks = (k1 + SLOTS_PER_TASK - 1) // SLOTS_PER_TASK
    for task in prange(nb * chunks):
        b = task // chunks
        for s in range((task % chunks) * SLOTS_PER_TASK, min((task % chunks + 1) * SLOTS_PER_TASK, k1)):
            lo, hi = first[b, s], first[b, s + 1]
            total = np.float32(0.0)
            for i in range(lo, hi):
                total += size[b, tokens[b, i]]
            out_size[b, s] = total
            denominator = total if weighted else np.float32(hi - lo)
            _wavg_row(hidden[b], tokens[b], lo, hi, size[b], weighted, denominator, out_hidden[b, s])
            _wavg_row(residual[b], tokens[b], lo, hi, size[b], weighted, denominator, out_residual[b, s])


@njit(inline="always")
def _grouped_slots(n, p, source, joins, dest):
    """One image's MTR plan: dest[t] = output slot of token t (N tokens, cls at p) → the cls token's slot.

    Among the M = N − 1 others (numbered without cls), the tokens in source join the ones joins names; the
    others survive in order; cls goes back after exactly the survivors that preceded it, and the slots at or
    after it move up by one.
    """
    m = n - 1
    partner = np.full(m, -1, np.int64)
    for i in range(source.shape[0]):
        partner[source[i]] = joins[i]
    slot = np.empty(m, np.int64)
    s, q = 0, 0
    for j in range(m):
        if partner[j] < 0:
            slot[j] = s
            s += 1
            if j < p:
                q += 1
    for t in range(n):
        if t == p:
            dest[t] = q
            continue
        j = t - 1 if t > p else t
        d = slot[partner[j]] if partner[j] >= 0 else slot[j]
        dest[t] = d + 1 if d >= q else d
    return q


@njit(fastmath=False, error_model="numpy", cache=True)
def _grouped_plan(cls_index, source, joins, cls_slot, first, tokens):
    """grouped_mean's serial part, image by image (O(N) each), as _plan's: each token's slot and the tokens of each
    slot (_grouped_slots, _group) into first (B×(K+2)) and tokens (B×N)."""
    nb, n = tokens.shape
    k1 = first.shape[1] - 1
    dest = np.empty(n, np.int64)
    for b in range(nb):
        cls_slot[b] = _grouped_slots(n, cls_index[b], source[b], joins[b], dest)
        _group(dest, k1, first[b], tokens[b])


@njit(fastmath=False, error_model="numpy", cache=True)
def grouped_mean(hidden, residual, size, cls_index, source, joins, out_hidden, out_residual, out_size, cls_slot):
    """MTR's merge of B×N×C hidden and residual streams (B×N sizes, cls at cls_index) into K + 1 slots: the tokens
    source names (B×n, among the N − 1 non-cls tokens) join the ones joins names, each slot the plain mean of its
    tokens, its size their summed size; out_* B×(K+1)×C and B×(K+1); cls_slot (B) gets cls's new position. What
    grouped_plan (after its grouping), with_cls and Merge("mean") do with tensor operations, to the bit. All
    float32 contiguous but the int64 indices; no bounds checks."""
    nb, n = size.shape
    k1 = out_size.shape[1]
    first = np.empty((nb, k1 + 1), np.int64)
    tokens = np.empty((nb, n), np.int64)
    _grouped_plan(cls_index, source, joins, cls_slot, first, tokens)
    _average(hidden, residual, size, False, first, tokens, out_hidden, out_residual, out_size)
