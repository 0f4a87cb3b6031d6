"""Numba kernels for the fused CPU selective scan: bias, softplus, scan, D skip and z gate in one pass.

Channels are processed in blocks of ``LANES``; a task is (batch, block) and its inputs are gathered
into rows laid out L×LANES (kept per block for the backward when gradients are needed), so every
inner loop runs over LANES contiguous channels and vectorises. fastmath stays off (no
reassociation); multiply-adds are explicit single-rounding FMAs and exp/softplus are vectorisable
float32 polynomials, so results match the PyTorch oracle to a few ulp. Tasks are dealt round-robin
to G groups that run in parallel and own their scratch rows (all buffers are passed in, so LLVM
knows they alias nothing). The backward recomputes the states instead of storing them.

    u, delta, z, out, gout, gu, gdelta, gz: B×D×L (z, gz: any 3-d array when has_z is False)
    At: K×N×LANES    Dv, bias: K×LANES (zero-padded; zeros mean "absent")    Bm, Cm: B×L×N
"""

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

LANES = 64

_F1 = np.float32(1.0)
_LOG2E = np.float32(1.44269504)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_SOFTPLUS_LINEAR = np.float32(20.0)  # softplus(x) = x above this (as torch does)


def saved_shapes(nl: int) -> tuple[tuple[int, ...], ...]:
    """Shapes (after the slot axis) of scan_forward's gathered inputs xs, dt."""
    return (3, nl, LANES), (nl, LANES)


def forward_scratch(nl: int) -> tuple[tuple[int, ...], ...]:
    """Per-group scratch shapes of scan_forward: ys, h."""
    return (nl, LANES), (LANES,)


def backward_scratch(nl: int) -> tuple[tuple[int, ...], ...]:
    """Per-group scratch shapes of scan_backward: gg, acc, ws, hs, da, st."""
    return (3, nl, LANES), (3, nl, LANES), (3, nl, LANES), (nl + 1, LANES), (nl, LANES), (2, LANES)


@intrinsic
def _int_as_float(typingctx, bits):
    """Reinterpret the bits of an int32 as a float32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    """a·b + c with a single rounding (hardware FMA where available)."""

    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(inline="always")
def _exp(x):
    """float32 exp, Cephes-style (≈1 ulp), vectorisable; x is clamped to [-87, 88]."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    k = np.floor(x * _LOG2E + np.float32(0.5))
    r = _fma(-k, _LN2_LO, _fma(-k, _LN2_HI, x))
    p = np.float32(1.9875691500e-4)
    p = _fma(p, r, np.float32(1.3981999507e-3))
    p = _fma(p, r, np.float32(8.3334519073e-3))
    p = _fma(p, r, np.float32(4.1665795894e-2))
    p = _fma(p, r, np.float32(1.6666665459e-1))
    p = _fma(p, r, np.float32(5.0000001201e-1))
    p = _fma(p, r * r, r) + _F1
    return p * _int_as_float((np.int32(k) + np.int32(127)) << np.int32(23))


@njit(inline="always")
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(e), e = exp(−|x|) ∈ (0, 1]; x above 20 passes through.

    log1p(e) = 2·atanh(s), s = e/(2 + e) ≤ 1/3: the odd series to s¹³ is exact to ~1e-8 relative.
    """
    e = _exp(-abs(x))
    s = e / (np.float32(2.0) + e)
    q = s * s
    p = np.float32(1.0 / 13.0)
    p = _fma(p, q, np.float32(1.0 / 11.0))
    p = _fma(p, q, np.float32(1.0 / 9.0))
    p = _fma(p, q, np.float32(1.0 / 7.0))
    p = _fma(p, q, np.float32(1.0 / 5.0))
    p = _fma(p, q, np.float32(1.0 / 3.0))
    log1p = np.float32(2.0) * _fma(p * q, s, s)
    return x if x > _SOFTPLUS_LINEAR else max(x, np.float32(0.0)) + log1p


@njit(inline="always")
def _sigmoid(x):
    return _F1 / (_F1 + _exp(-x))


@njit(inline="always")
def _gather(src, dst, slot, row, b, k, bias):
    """dst[slot, row, t, j] = src[b, k·LANES + j, t] (+ bias[k, j] when bias has rows), zeros past D."""
    nd, nl = src.shape[1], src.shape[2]
    for j in range(LANES):
        c = k * LANES + j
        if c < nd:
            add = bias[k, j] if bias.shape[0] > 0 else np.float32(0.0)
            for t in range(nl):
                dst[slot, row, t, j] = src[b, c, t] + add
        else:
            for t in range(nl):
                dst[slot, row, t, j] = 0


@njit(inline="always")
def _scatter(src, slot, row, dst, b, k):
    """dst[b, k·LANES + j, t] = src[slot, row, t, j] for the channels of block k that exist."""
    nd, nl = dst.shape[1], dst.shape[2]
    for j in range(min(LANES, nd - k * LANES)):
        for t in range(nl):
            dst[b, k * LANES + j, t] = src[slot, row, t, j]


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def scan_forward(u, delta, At, Bm, Cm, Dv, bias, z, softplus, has_z, out, xs, dt, ys, h):
    """out = (Σ_n C·h + D·u)·silu(z).

    xs S×3×L×LANES (u, delta + bias, z) and dt S×L×LANES (softplus?(delta + bias)) hold the gathered
    inputs: S = B·K keeps every block for scan_backward, S = G reuses one slot per group.
    Scratch: ys G×L×LANES, h G×LANES.
    """
    nb, nl = u.shape[0], u.shape[2]
    nblk, nn = At.shape[0], At.shape[1]
    ntask = nb * nblk
    ngroup = h.shape[0]
    for g in prange(ngroup):
        for task in range(g, ntask, ngroup):
            b = task // nblk
            k = task % nblk
            slot = task if xs.shape[0] == ntask else np.int64(g)
            _gather(u, xs, slot, 0, b, k, bias[:0])
            _gather(delta, xs, slot, 1, b, k, bias)
            if has_z:
                _gather(z, xs, slot, 2, b, k, bias[:0])
            for t in range(nl):
                for j in range(LANES):
                    x = xs[slot, 1, t, j]
                    sp = _softplus(x)
                    dt[slot, t, j] = sp if softplus else x
                    ys[g, t, j] = Dv[k, j] * xs[slot, 0, t, j]
            for n in range(nn):
                for j in range(LANES):
                    h[g, j] = 0
                for t in range(nl):
                    bv = Bm[b, t, n]
                    cv = Cm[b, t, n]
                    for j in range(LANES):
                        x = dt[slot, t, j]
                        hv = _fma(_exp(x * At[k, n, j]), h[g, j], x * xs[slot, 0, t, j] * bv)
                        h[g, j] = hv
                        ys[g, t, j] = _fma(hv, cv, ys[g, t, j])
            if has_z:
                for t in range(nl):
                    for j in range(LANES):
                        zv = xs[slot, 2, t, j]
                        ys[g, t, j] *= zv * _sigmoid(zv)
            _scatter(ys[:, None], g, 0, out, b, k)


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def scan_backward(
    xs, dt, At, Bm, Cm, Dv, gout, softplus, has_z, gu, gdelta, gz, gA, gB, gC, gD, gbias, gg, acc, ws, hs, da, st
):
    """Gradients of scan_forward from its saved blocks xs, dt (S = B·K), recomputing the states of
    one state index n at a time.

    Tasks are (batch, part): part p owns blocks [p·K/P, (p+1)·K/P) and the partial sums gB[p], gC[p]
    (P×B×N×L×LANES; the first block of a part overwrites them). gA: B×K×N×LANES and gD, gbias:
    B×K×LANES are partial sums too. Scratch per group g (G×…): gg 3×L×LANES (∂out, ∂y, silu'(z)),
    acc 3×L×LANES (Σ_n ∂/∂dt through the decay, Σ_n ∂h·B, y before the gate), ws 3×L×LANES
    (∂delta, ∂u, ∂z), hs (L+1)×LANES states, da L×LANES decays, st 2×LANES (carried ∂h, ∂A).
    """
    nb = gout.shape[0]
    nblk = At.shape[0]
    npart = gB.shape[0]
    ntask = nb * npart
    ngroup = hs.shape[0]
    for g in prange(ngroup):
        for task in range(g, ntask, ngroup):
            b = task // npart
            p = task % npart
            for k in range(p * nblk // npart, (p + 1) * nblk // npart):
                slot = b * nblk + k
                _gather(gout, gg, g, 0, b, k, Dv[:0])
                _grad_in(Dv, has_z, xs, gg, acc, slot, g, k)
                first = k == p * nblk // npart
                _block_backward(At, Bm, Cm, gA, gB, gC, xs, dt, gg, acc, hs, da, st, slot, g, b, k, p, first)
                _block_finish(Dv, softplus, gD, gbias, xs, dt, gg, acc, ws, slot, g, b, k)
                _scatter(ws, g, 0, gdelta, b, k)
                _scatter(ws, g, 1, gu, b, k)
                if has_z:
                    _scatter(ws, g, 2, gz, b, k)


@njit(inline="always")
def _grad_in(Dv, has_z, xs, gg, acc, slot, g, k):
    """gg[g] rows: ∂y = ∂out·silu(z) and silu'(z); acc rows zeroed, row 2 starts at D·u."""
    nl = gg.shape[2]
    if has_z:
        for t in range(nl):
            for j in range(LANES):
                zv = xs[slot, 2, t, j]
                s = _sigmoid(zv)
                gg[g, 1, t, j] = gg[g, 0, t, j] * zv * s
                gg[g, 2, t, j] = s * (_F1 + zv * (_F1 - s))
    else:
        for t in range(nl):
            for j in range(LANES):
                gg[g, 1, t, j] = gg[g, 0, t, j]
    for t in range(nl):
        for j in range(LANES):
            acc[g, 0, t, j] = 0
            acc[g, 1, t, j] = 0
            acc[g, 2, t, j] = Dv[k, j] * xs[slot, 0, t, j]


@njit(inline="always")
def _block_backward(At, Bm, Cm, gA, gB, gC, xs, dt, gg, acc, hs, da, st, slot, g, b, k, p, first):
    """Recurrence gradients for batch b, channel block k: fills acc[g], gA[b, k], gB[p, b], gC[p, b]."""
    nl, nn = dt.shape[1], At.shape[1]
    for n in range(nn):
        for j in range(LANES):
            hs[g, 0, j] = 0
            st[g, 0, j] = 0
            st[g, 1, j] = 0
        for t in range(nl):
            bv = Bm[b, t, n]
            cv = Cm[b, t, n]
            for j in range(LANES):
                x = dt[slot, t, j]
                a = _exp(x * At[k, n, j])
                hv = _fma(a, st[g, 0, j], x * xs[slot, 0, t, j] * bv)
                st[g, 0, j] = hv
                da[g, t, j] = a
                hs[g, t + 1, j] = hv
                acc[g, 2, t, j] = _fma(hv, cv, acc[g, 2, t, j])
        for j in range(LANES):
            st[g, 0, j] = 0
        for t in range(nl - 1, -1, -1):
            bv = Bm[b, t, n]
            cv = Cm[b, t, n]
            for j in range(LANES):
                gyv = gg[g, 1, t, j]
                st[g, 0, j] = _fma(gyv, cv, st[g, 0, j])
                prev = np.float32(0.0) if first else gC[p, b, n, t, j]
                gC[p, b, n, t, j] = _fma(gyv, hs[g, t + 1, j], prev)
            for j in range(LANES):
                prev = np.float32(0.0) if first else gB[p, b, n, t, j]
                gB[p, b, n, t, j] = _fma(st[g, 0, j], dt[slot, t, j] * xs[slot, 0, t, j], prev)
            for j in range(LANES):
                gh = st[g, 0, j]
                a = da[g, t, j]
                ga = gh * hs[g, t, j] * a
                acc[g, 0, t, j] = _fma(ga, At[k, n, j], acc[g, 0, t, j])
                acc[g, 1, t, j] = _fma(gh, bv, acc[g, 1, t, j])
                st[g, 1, j] = _fma(ga, dt[slot, t, j], st[g, 1, j])
                st[g, 0, j] = gh * a
        for j in range(LANES):
            gA[b, k, n, j] = st[g, 1, j]


@njit(inline="always")
def _block_finish(Dv, softplus, gD, gbias, xs, dt, gg, acc, ws, slot, g, b, k):
    """ws[g] rows ∂delta, ∂u, ∂z for batch b, block k; partial sums gD[b, k], gbias[b, k]."""
    for j in range(LANES):
        gD[b, k, j] = 0
        gbias[b, k, j] = 0
    for t in range(dt.shape[1]):
        for j in range(LANES):
            uv, gyv = xs[slot, 0, t, j], gg[g, 1, t, j]
            gdt = _fma(acc[g, 1, t, j], uv, acc[g, 0, t, j])
            gdl = gdt * _sigmoid(xs[slot, 1, t, j])
            ws[g, 0, t, j] = gdl if softplus else gdt
            ws[g, 1, t, j] = _fma(acc[g, 1, t, j], dt[slot, t, j], gyv * Dv[k, j])
            ws[g, 2, t, j] = gg[g, 0, t, j] * acc[g, 2, t, j] * gg[g, 2, t, j]
            gD[b, k, j] = _fma(gyv, uv, gD[b, k, j])
            gbias[b, k, j] += ws[g, 0, t, j]
