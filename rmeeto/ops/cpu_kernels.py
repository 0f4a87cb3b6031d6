"""Numba kernels for the fused CPU selective scan: bias, softplus, scan, D skip and z gate in one pass (and,
for mamba_inner_cpu, Δ's rank-R product from x_proj's output).

Channels are processed in blocks of ``LANES``; a task is (batch, block) and its inputs are read as rows of
LANES contiguous channels: in place for a full block of token-major (B×L×D) arrays in the forward, else
gathered into rows laid out L×LANES (8×8 tiles transposed in registers), so every inner loop runs over
LANES contiguous channels and vectorises; the recurrence of one position over all N states (_advance, and
_retreat in the backward) is written as explicit 16-float vectors in LLVM IR, so its accumulators stay
in registers. fastmath stays off (no reassociation); multiply-adds are
explicit single-rounding FMAs and exp/softplus are vectorisable float32 polynomials, so results
match the PyTorch oracle to a few ulp. G groups run in parallel, take tasks from a shared atomic
counter (int64 (1,), zeroed) and own their scratch (passed in, one array per role). The backward
gathers the inputs again and recomputes the states of one channel block at a time (keeping them in
scratch) instead of storing them in the forward.

    u, delta, z, gout, out, gu, gdelta, gz: B×D×L, or all B×L×D ("token-major", tm)
    (z, gz: any such array when has_z is False)
    rev: scan from the last position to the first (tm only: rows are gathered in reverse order)
    A: D×N    Dv, bias: (D,) (zeros mean "absent")    Bm, Cm: B×L×N
    Each task lays out its block's A, Dv and bias as lanes itself (scratch ps, zero-padded past D).
    scan_forward and conv_forward take P directions at once: their per-direction arrays stacked along a first
    axis, and revs (P,) in place of rev; scan_backward takes them as tuples of arrays (the directions' saved
    tensors are separate), with revs.
"""

import numba
import numpy as np
from llvmlite import binding, ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .packed import NO_TRANS, PACKED, ROW_MAJOR

LANES = 64
D_SKIP, BIAS, A_ROWS = 0, 1, 2
"""Rows of the parameter scratch ps after its N rows of A·log₂e: D, the Δ bias, then N rows of A (see
_load_params)."""

_F1 = np.float32(1.0)
_LOG2E = np.float32(1.44269504)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_ROUND = np.float32(12582912.0)  # 1.5·2²³: x + _ROUND rounds x to an integer
_SOFTPLUS_LINEAR = np.float32(20.0)  # softplus(x) = x above this (as torch does)
_EXP_LO, _EXP_HI = np.float32(-87.0), np.float32(88.0)  # _exp's clamp
_EXP_Q = tuple(np.float32(c) for c in (8.31253e-3, 4.189011e-2, 1.6667114e-1, 4.9999232e-1))
"""_exp's cubic q(r) = ((c0·r + c1)·r² + (c2·r + c3)); _vec_exp uses the same, for the same bits."""


@njit(cache=True)
def forward_scratch(nl: int, nn: int) -> tuple[tuple[int, ...], ...]:
    """Per-group scratch shapes of scan_forward: xs, dt, dtu, ys, h, ps (compiled: blocks_kernel lays them out too)."""
    return (3, nl, LANES), (nl, LANES), (nl, LANES), (nl, LANES), (nn, LANES), (2 * nn + 2, LANES)


def backward_scratch(nl: int, nn: int) -> tuple[tuple[int, ...], ...]:
    """Per-group scratch shapes of scan_backward: xs, dt, dtu, go, gy, gdec, ghb, yb, hs, gh, gacc, sums, ps."""
    return ((4, nl, LANES), *[(nl, LANES)] * 7, (nl + 1, nn, LANES), *[(nn, LANES)] * 2, (2, nn),
            (2 * nn + 2, LANES))


def _vector_bits() -> int | None:
    """512 when the CPU numba compiles for has AVX-512 F and DQ (NUMBA_CPU_FEATURES, else the host's; every
    AVX-512 CPU since Skylake-SP has both, and _vec_exp2 uses DQ's vreduceps), else None."""
    features = (numba.config.CPU_FEATURES or binding.get_host_cpu_features().flatten()).split(",")
    return 512 if {"+avx512f", "+avx512dq"} <= set(features) else None


_VECTOR_BITS = _vector_bits()


@intrinsic
def _full_width(typingctx):
    """Ask LLVM to vectorise the function being compiled at the CPU's full vector width (emits no code).

    On x86 with AVX-512, LLVM prefers 256-bit vectors unless told otherwise; numba's only switch for that
    is NUMBA_CPU_FEATURES, which applies to every numba function in the process. This sets the same
    preference as an attribute of one function: each kernel's parallel body calls it. Measured here: the
    scan forward 1.18× and its backward 1.55× as fast, with the same results to the bit. llvmlite's
    attribute set admits only keyword attributes, so the string attribute is added through set.add.
    """

    def codegen(context, builder, signature, args):
        if _VECTOR_BITS:
            set.add(builder.function.attributes, f'"prefer-vector-width"="{_VECTOR_BITS}"')
        return context.get_dummy_value()

    return types.void(), codegen


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
    """float32 exp to 2e-7 relative (3 ulp), vectorisable; x is clamped to [-87, 88].

    Cody–Waite reduction to r ∈ [−ln2/2, ln2/2], then 1 + r + r²·q(r), q a cubic fitted for the
    least maximum relative error (Lawson's weighted least squares) and evaluated by Estrin's scheme.
    For softplus and sigmoid, once per element; the decays, once per element and state, use _vec_exp2
    with log₂e folded into A.
    """
    x = min(max(x, _EXP_LO), _EXP_HI)
    k = np.floor(_fma(x, _LOG2E, np.float32(0.5)))
    r = _fma(-k, _LN2_LO, _fma(-k, _LN2_HI, x))
    r2 = r * r
    q = _fma(_fma(_EXP_Q[0], r, _EXP_Q[1]), r2, _fma(_EXP_Q[2], r, _EXP_Q[3]))
    p = _fma(q, r2, r) + _F1
    return p * _int_as_float((np.int32(k) + np.int32(127)) << np.int32(23))


@njit(inline="always")
def _softplus(x):
    """log(1 + exp(x)) = max(x, 0) + log1p(e), e = exp(−|x|) ∈ (0, 1]; x above 20 passes through.

    log1p(e) = 2·atanh(s), s = e/(2 + e) ≤ 1/3: the odd series to s¹³ (Estrin) is exact to ~1e-8
    relative.
    """
    e = _exp(-abs(x))
    s = e / (np.float32(2.0) + e)
    q = s * s
    q2 = q * q
    p = _fma(
        _fma(_fma(np.float32(1.0 / 13.0), q, np.float32(1.0 / 11.0)), q2,
             _fma(np.float32(1.0 / 9.0), q, np.float32(1.0 / 7.0))),
        q2,
        _fma(np.float32(1.0 / 5.0), q, np.float32(1.0 / 3.0)),
    )  # fmt: skip
    log1p = np.float32(2.0) * _fma(p * q, s, s)
    return x if x > _SOFTPLUS_LINEAR else max(x, np.float32(0.0)) + log1p


@njit(inline="always")
def _sigmoid(x):
    return _F1 / (_F1 + _exp(-x))


@intrinsic
def _take(typingctx, counter):
    """counter[0] += 1 atomically, returning the old value: groups take tasks as they become free, so
    a thread slowed by other work on its core does fewer of them."""
    if counter != types.Array(types.int64, 1, "C"):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.int64(counter), codegen


_UNPACK = ((0, 8, 1, 9, 4, 12, 5, 13), (2, 10, 3, 11, 6, 14, 7, 15))
_PAIRS = ((0, 1, 8, 9, 4, 5, 12, 13), (2, 3, 10, 11, 6, 7, 14, 15))
_HALVES = ((0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15))


def _vec_at(context, builder, aryty, ary, index, width=8):
    """LLVM pointer to the ``width`` floats at ary[index] (ary: 1-d contiguous float32)."""
    data = context.make_array(aryty)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [index]), ir.VectorType(ir.FloatType(), width).as_pointer())


@intrinsic
def _transpose8(typingctx, src, s, ss, dst, d, ds):
    """dst[d + r·ds + c] = src[s + c·ss + r] for r, c < 8: an 8×8 float32 tile transposed in registers.

    src, dst: 1-d contiguous float32; no bounds checks.
    """
    flat = (types.Array(types.float32, 1, "C"), types.Array(types.float32, 1, "C", readonly=True))
    if src not in flat or dst != flat[0]:
        return None

    def codegen(context, builder, signature, args):
        def tile_row(i, m):  # &array_i[start_i + m·stride_i]
            index = builder.add(args[i + 1], builder.mul(args[i + 2], ir.Constant(args[i + 2].type, m)))
            return _vec_at(context, builder, signature.args[i], args[i], index)

        def stage(v, pairs, masks):
            mask = ir.VectorType(ir.IntType(32), 8)
            return [builder.shuffle_vector(v[a], v[b], ir.Constant(mask, m)) for a, b in pairs for m in masks]

        v = [builder.load(tile_row(0, c), align=4) for c in range(8)]
        v = stage(v, ((0, 1), (2, 3), (4, 5), (6, 7)), _UNPACK)
        v = stage(v, ((0, 2), (1, 3), (4, 6), (5, 7)), _PAIRS)
        v = stage(v, ((0, 4), (1, 5), (2, 6), (3, 7)), _HALVES)  # order: columns 0, 4, 1, 5, 2, 6, 3, 7
        for r in range(8):
            builder.store(v[2 * (r % 4) + r // 4], tile_row(3, r), align=4)
        return context.get_dummy_value()

    return types.void(src, types.intp, types.intp, dst, types.intp, types.intp), codegen


def _tree_sum(builder, v):
    """The sum of the lanes of 8-wide float32 vectors v (in lane order) by a fixed pairwise tree: vectors
    added pairwise, then halves of the last one, so the result does not depend on the compiler."""
    while len(v) > 1:
        v = [builder.fadd(v[i], v[i + 1]) for i in range(0, len(v) - 1, 2)] + v[len(v) - len(v) % 2 :]
    x = v[0]
    for width in (4, 2, 1):
        half = [ir.Constant(ir.VectorType(ir.IntType(32), width), list(range(o, o + width))) for o in (0, width)]
        x = builder.fadd(*(builder.shuffle_vector(x, x, m) for m in half))
    return builder.extract_element(x, ir.Constant(ir.IntType(32), 0))


@intrinsic
def _lane_sum(typingctx, src, s):
    """src[s] + … + src[s + LANES − 1] in float32 by _tree_sum's fixed tree. src: 1-d contiguous float32."""
    if src != types.Array(types.float32, 1, "C"):
        return None

    def codegen(context, builder, signature, args):
        def at(i):  # &src[s + i]
            return _vec_at(
                context, builder, signature.args[0], args[0], builder.add(args[1], ir.Constant(args[1].type, i))
            )

        return _tree_sum(builder, [builder.load(at(i), align=4) for i in range(0, LANES, 8)])

    return types.float32(src, types.intp), codegen


_WIDTH = 16
"""Floats per vector in the explicitly vectorised code (_advance, _retreat): one AVX-512 register; LLVM
splits it into narrower registers on CPUs without."""
_PARTS = range(0, LANES, _WIDTH)  # the offsets of a row's vectors


class _Vectors:
    """Explicit-vector IR over an intrinsic's arguments, 1-d contiguous float32 arrays (no bounds checks)."""

    def __init__(self, context, builder, signature, args):
        self.context, self.builder, self.tys, self.args = context, builder, signature.args, args
        self.vty = ir.VectorType(ir.FloatType(), _WIDTH)
        self.fma_fn = _vec_fma(builder, self.vty)

    def at(self, i, base, offset=0):
        """&array_i[base + offset] as a vector pointer (base: an LLVM integer, offset: a Python int)."""
        index = self.builder.add(base, ir.Constant(base.type, offset))
        return _vec_at(self.context, self.builder, self.tys[i], self.args[i], index, _WIDTH)

    def row(self, i, base):
        """The LANES floats at array_i[base], as vectors."""
        return [self.builder.load(self.at(i, base, o), align=4) for o in _PARTS]

    def store_row(self, values, i, base):
        for v, o in zip(values, _PARTS, strict=True):
            self.builder.store(v, self.at(i, base, o), align=4)

    def splat(self, i, index):
        """array_i[index] in every lane."""
        builder = self.builder
        data = self.context.make_array(self.tys[i])(self.context, builder, self.args[i]).data
        one = builder.insert_element(ir.Constant(self.vty, None), builder.load(builder.gep(data, [index])),
                                     ir.Constant(ir.IntType(32), 0))  # fmt: skip
        return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), _WIDTH), [0] * _WIDTH))

    def fma(self, a, b, c):
        return self.builder.call(self.fma_fn, [a, b, c])

    def lane_sum(self, values):
        """The sum of a row's LANES floats, in _lane_sum's order."""
        halves = [ir.Constant(ir.VectorType(ir.IntType(32), 8), list(range(o, o + 8))) for o in (0, 8)]
        return _tree_sum(self.builder, [self.builder.shuffle_vector(v, v, m) for v in values for m in halves])

    def state_loop(self, nn, carried, body):
        """for n in range(nn): carried = body(n, carried), with carried (LLVM values) kept in registers;
        returns the final values (the initial ones when nn ≤ 0)."""
        builder = self.builder
        zero = ir.Constant(nn.type, 0)
        entry = builder.block
        loop = builder.append_basic_block("states")
        done = builder.append_basic_block("states.done")
        builder.cbranch(builder.icmp_signed(">", nn, zero), loop, done)
        builder.position_at_end(loop)
        n = builder.phi(nn.type)
        phis = [builder.phi(v.type) for v in carried]
        new = body(n, phis)
        n_next = builder.add(n, ir.Constant(nn.type, 1))
        end = builder.block
        for phi, first, last in zip([n, *phis], [zero, *carried], [n_next, *new], strict=True):
            phi.add_incoming(first, entry)
            phi.add_incoming(last, end)
        builder.cbranch(builder.icmp_signed("<", n_next, nn), loop, done)
        builder.position_at_end(done)
        out = [builder.phi(v.type) for v in carried]
        for phi, first, last in zip(out, carried, new, strict=True):
            phi.add_incoming(first, entry)
            phi.add_incoming(last, end)
        return out


def _intrinsic(builder, name, ret, params):
    """The LLVM intrinsic ``name`` (declared in the module being built once)."""
    return builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(ret, params), name)


def _splat(vty, c):
    """The float32 constant c in every lane of vector type vty."""
    return ir.Constant(vty, [float(np.float32(c))] * vty.count)


def _vec_fma(builder, vty):
    """llvm.fma for vectors of type vty (llvmlite's builder.fma takes scalars only)."""
    return _intrinsic(builder, f"llvm.fma.v{vty.count}f32", vty, [vty] * 3)


def _vec_exp2(builder, x, scalef=None):
    """float32 2^x on a vector, to 2e-7 relative, in fewer operations than _exp (the decays, once per element
    and state): 2^k·p(f), k = x rounded to the nearest integer, f = x − k ∈ [−½, ½], p of degree 5 through
    p(0) = 1, fitted for the least maximum relative error (Lawson's weighted least squares), by Horner's scheme
    (the scan evaluates many independently, so the dependency chain does not matter, the operation count does).

    With AVX-512 (``scalef``, default: when the kernels are compiled for it), f comes from one vreduceps (x minus
    x rounded to the nearest integer, exact), k = x − f (exact), and 2^k·p from one vscalefps, which is exact
    over float32's whole range (0 below it, inf above), so x needs no clamp. Otherwise x is clamped to [-125,
    126], adding 1.5·2²³ rounds it to k kept in the low bits of the sum, and 2^k·p is an integer add of k·2²³
    to the bits of p. Both give the same bits for x in [-125, 126] (both round to nearest even); the AVX-512
    form takes 8 vector operations where the other takes 12–14 (LLVM may turn a clamp's compare and
    select into a min or max). The scan's forward
    ran 1.10–1.14× as fast with this function (the clamped form) as with _exp, and 1.02–1.17× as fast again
    with the AVX-512 form (docs/cpu_speed.md, round 7); taking f from vreduceps (one µop) instead of rounding
    with vrndscaleps (two, on one port) and subtracting made a Vim-S mixer's conv + scan 1.03–1.05× as fast
    again, with the same bits (round 11)."""
    vty = x.type
    ity = ir.VectorType(ir.IntType(32), vty.count)
    scalef = _VECTOR_BITS == 512 and vty.count == 16 if scalef is None else scalef

    def const(c):
        return _splat(vty, c)

    def poly(f):
        p = builder.call(fma, [builder.call(fma, [const(1.3264698e-3), f, const(9.6715093e-3)]), f,
                               const(5.5507340e-2)])  # fmt: skip
        for c in (2.4022242e-1, 6.931470e-1, 1.0):
            p = builder.call(fma, [p, f, const(c)])
        return p

    fma = _vec_fma(builder, vty)
    if scalef:
        i16, i32 = ir.IntType(16), ir.IntType(32)
        masked = [ir.Constant(vty, None), ir.Constant(i16, -1), ir.Constant(i32, 4)]  # no pass-through, all lanes
        reduce = _intrinsic(builder, "llvm.x86.avx512.mask.reduce.ps.512", vty, [vty, i32, vty, i16, i32])
        f = builder.call(reduce, [x, ir.Constant(i32, 8), *masked])  # imm 8: x − roundeven(x), no precision exception
        scale = _intrinsic(builder, "llvm.x86.avx512.mask.scalef.ps.512", vty, [vty, vty, vty, i16, i32])
        return builder.call(scale, [poly(f), builder.fsub(x, f), *masked])
    lo, hi, rnd = const(-125.0), const(126.0), const(_ROUND)
    x = builder.select(builder.fcmp_ordered(">", lo, x), lo, x)  # max(x, lo), as numba compiles it
    x = builder.select(builder.fcmp_ordered("<", hi, x), hi, x)
    kf = builder.fadd(x, rnd)
    p = poly(builder.fsub(x, builder.fsub(kf, rnd)))
    k = builder.shl(builder.bitcast(kf, ity), ir.Constant(ity, [23] * vty.count))
    return builder.bitcast(builder.add(builder.bitcast(p, ity), k), vty)


def _vec_exp(builder, x):
    """_exp on a vector of float32, operation for operation as numba compiles the scalar function (the clamps
    as its min and max, floor, the conversion to int32), so the same bits: for the gate's sigmoid in _advance."""
    vty = x.type
    ity = ir.VectorType(ir.IntType(32), vty.count)
    fma = _vec_fma(builder, vty)

    def const(c):
        return _splat(vty, c)

    def call(*a):
        return builder.call(fma, list(a))

    lo, hi = const(_EXP_LO), const(_EXP_HI)
    x = builder.select(builder.fcmp_ordered(">", lo, x), lo, x)
    x = builder.select(builder.fcmp_ordered("<", hi, x), hi, x)
    floor = _intrinsic(builder, f"llvm.floor.v{vty.count}f32", vty, [vty])
    k = builder.call(floor, [call(x, const(_LOG2E), const(0.5))])
    nk = builder.fneg(k)
    r = call(nk, const(_LN2_LO), call(nk, const(_LN2_HI), x))
    r2 = builder.fmul(r, r)
    c = [const(v) for v in _EXP_Q]
    q = call(call(c[0], r, c[1]), r2, call(c[2], r, c[3]))
    p = builder.fadd(call(q, r2, r), const(1.0))
    bits = builder.shl(builder.add(builder.fptosi(k, ity), ir.Constant(ity, [127] * vty.count)),
                       ir.Constant(ity, [23] * vty.count))  # fmt: skip
    return builder.fmul(p, builder.bitcast(bits, vty))


_FLAT = (types.Array(types.float32, 1, "C"), types.Array(types.float32, 1, "C", readonly=True))


@intrinsic
def _advance(typingctx, dt, dtu, ys, h, ps, bm, cm, row, yrow, hrow, hout, arow, bcrow, nn, us, urow, zs, zrow, add):
    """One position of the scan's recurrence for LANES channels and all N states, in explicit vectors:

        for n < N:  h′[n] = 2^(dt·A′[n])·h[n] + dtu·B[n];  ys += h′[n]·C[n]

    dt, dtu: the rows at [row, row + LANES); ys: the row at yrow; h: N×LANES states at hrow, h′ written at hout
    (the same place, or the next position's); ps: A′ = A·log₂e as N rows of LANES at arow, D right after
    them; bm, cm: B and C of this position at [bcrow, bcrow + N). With ``us`` (else None), ys starts as D·u
    (u: the row at urow of us) instead of being read; with ``zs``, y is then gated: ys = y·(z·sigmoid(z)),
    z the row at zrow of zs. With ``add`` nonzero the row at yrow gets its old value plus y (a second scan
    direction's y added to the first's where it lies). All 1-d contiguous float32; no bounds checks. The
    same operations in the same order as the scalar loops they replaced (the gate's exp is _exp's, operation for
    operation), so the same results; but ys stays in registers across the N states and the gate, and dt, dtu are loaded
    once.
    """
    optional = (*_FLAT, types.none)
    if any(a != _FLAT[0] for a in (dt, dtu, ys, h, ps)) or {bm, cm} - set(_FLAT) or {us, zs} - set(optional):
        return None

    def codegen(context, builder, signature, args):
        row, yrow, hrow, hout, arow, bcrow, nn, _, urow, _, zrow, add = args[7:]
        v = _Vectors(context, builder, signature, args)
        dtv, dtuv = v.row(0, row), v.row(1, row)

        def state(n, ys):
            bv, cv = v.splat(5, builder.add(bcrow, n)), v.splat(6, builder.add(bcrow, n))
            nrow = builder.mul(n, ir.Constant(n.type, LANES))
            h_in = v.row(3, builder.add(hrow, nrow))
            a = v.row(4, builder.add(arow, nrow))
            h = [v.fma(_vec_exp2(builder, builder.fmul(d, ai)), hi, builder.fmul(du, bv))
                 for d, ai, hi, du in zip(dtv, a, h_in, dtuv, strict=True)]  # fmt: skip
            v.store_row(h, 3, builder.add(hout, nrow))
            return [v.fma(hi, cv, y) for hi, y in zip(h, ys, strict=True)]

        if signature.args[14] == types.none:
            ys = v.row(2, yrow)
        else:
            d_row = builder.add(arow, builder.mul(builder.add(nn, ir.Constant(nn.type, D_SKIP)),
                                                  ir.Constant(nn.type, LANES)))  # fmt: skip
            ys = [builder.fmul(d, u) for d, u in zip(v.row(4, d_row), v.row(14, urow), strict=True)]
        ys = v.state_loop(nn, ys, state)
        if signature.args[16] != types.none:
            one = _splat(v.vty, 1.0)
            for i, z in enumerate(v.row(16, zrow)):
                gate = builder.fdiv(one, builder.fadd(one, _vec_exp(builder, builder.fneg(z))))  # sigmoid(z)
                ys[i] = builder.fmul(ys[i], builder.fmul(z, gate))
        adding = builder.icmp_signed("!=", add, ir.Constant(add.type, 0))
        ys = [builder.select(adding, builder.fadd(old, y), y) for old, y in zip(v.row(2, yrow), ys, strict=True)]
        v.store_row(ys, 2, yrow)
        return context.get_dummy_value()

    ints = [types.intp] * 7
    return types.void(dt, dtu, ys, h, ps, bm, cm, *ints, us, types.intp, zs, types.intp, types.intp), codegen


@intrinsic
def _retreat(
    typingctx, gy, dt, dtu, gdec, ghb, hs, gh, gacc, ps, bm, cm, sums, row, hsrow, ghrow, arow, bcrow, srow, nn
):
    """One position t of the backward's reverse pass for LANES channels and all N states, in explicit
    vectors (the decays recomputed, as in the forward):

        for n < N:  ∂h = gy·C[n] + gh[n];  sums[n] = Σ_lanes gy·h_{t+1}[n];  sums[N + n] = Σ_lanes ∂h·dtu;
                    ga = ∂h·h_t[n]·decay;  gdec += ga·A[n];  ghb += ∂h·B[n];  gacc[n] += ga·dt;
                    gh[n] = ∂h·decay

    gy, dt, dtu, gdec, ghb: the rows at [row, row + LANES); hs: h_t (N×LANES) at hsrow, h_{t+1} right
    after it; gh, gacc: N×LANES at ghrow; ps: A′ = A·log₂e (N rows of LANES) at arow, then A's rows from
    arow + (N + A_ROWS)·LANES; bm, cm: B and C of this position at [bcrow, bcrow + N); sums: 2N floats
    at srow.
    All 1-d contiguous float32; no bounds checks. The same operations in the same order as the scalar
    loop it replaced (lane sums by _lane_sum's tree), so the same results; gdec and ghb stay in registers
    across the N states instead of being read and written back for each.
    """
    if any(a != _FLAT[0] for a in (gy, dt, dtu, gdec, ghb, hs, gh, gacc, ps, sums)) or {bm, cm} - set(_FLAT):
        return None

    def codegen(context, builder, signature, args):
        row, hsrow, ghrow, arow, bcrow, srow, nn = args[12:]
        v = _Vectors(context, builder, signature, args)
        gyv, dtv, dtuv = v.row(0, row), v.row(1, row), v.row(2, row)
        sums = context.make_array(signature.args[11])(context, builder, args[11]).data
        lanes = ir.Constant(nn.type, LANES)
        hs_next = builder.add(hsrow, builder.mul(nn, lanes))  # h_{t+1}[0]
        a_rows = builder.add(arow, builder.mul(builder.add(nn, ir.Constant(nn.type, A_ROWS)), lanes))  # A[0]

        def state(n, acc):
            gdec, ghb = acc[: len(_PARTS)], acc[len(_PARTS) :]
            bv, cv = v.splat(9, builder.add(bcrow, n)), v.splat(10, builder.add(bcrow, n))
            nrow = builder.mul(n, lanes)
            h_prev = v.row(5, builder.add(hsrow, nrow))
            h_next = v.row(5, builder.add(hs_next, nrow))
            a_log2, a = v.row(8, builder.add(arow, nrow)), v.row(8, builder.add(a_rows, nrow))
            gh = v.row(6, builder.add(ghrow, nrow))
            gacc = v.row(7, builder.add(ghrow, nrow))
            dh = [v.fma(g, cv, x) for g, x in zip(gyv, gh, strict=True)]
            builder.store(v.lane_sum([builder.fmul(g, x) for g, x in zip(gyv, h_next, strict=True)]),
                          builder.gep(sums, [builder.add(srow, n)]))  # fmt: skip
            builder.store(v.lane_sum([builder.fmul(d, x) for d, x in zip(dh, dtuv, strict=True)]),
                          builder.gep(sums, [builder.add(srow, builder.add(nn, n))]))  # fmt: skip
            decay = [_vec_exp2(builder, builder.fmul(d, al)) for d, al in zip(dtv, a_log2, strict=True)]
            ga = [builder.fmul(builder.fmul(d, x), e) for d, x, e in zip(dh, h_prev, decay, strict=True)]
            v.store_row([v.fma(g, d, x) for g, d, x in zip(ga, dtv, gacc, strict=True)], 7, builder.add(ghrow, nrow))
            v.store_row([builder.fmul(d, e) for d, e in zip(dh, decay, strict=True)], 6, builder.add(ghrow, nrow))
            return [v.fma(g, ai, x) for g, ai, x in zip(ga, a, gdec, strict=True)] + [
                v.fma(d, bv, x) for d, x in zip(dh, ghb, strict=True)
            ]

        acc = v.state_loop(nn, v.row(3, row) + v.row(4, row), state)
        v.store_row(acc[: len(_PARTS)], 3, row)
        v.store_row(acc[len(_PARTS) :], 4, row)
        return context.get_dummy_value()

    return types.void(gy, dt, dtu, gdec, ghb, hs, gh, gacc, ps, bm, cm, sums, *[types.intp] * 7), codegen


@njit(inline="always")
def _to_rows(src, tm, rev, b, k, dst, base):
    """Channels → lanes: dst[base + t·LANES + j] = x[b, k·LANES + j, t], zeros past D; row t holds
    position L − 1 − t instead when rev.

    src: x as B×D×L, or as B×L×D when tm (then rows are plain copies; rev needs tm); contiguous.
    dst: flat. B×D×L goes by 8×8 tiles transposed in registers, the ragged edges one by one.
    """
    if tm:
        nl, nd = src.shape[1], src.shape[2]
        nj = min(LANES, nd - k * LANES)
        flat = src.reshape(-1)
        for t in range(nl):
            row = base + (nl - 1 - t if rev else t) * LANES
            start = (b * nl + t) * nd + k * LANES
            if nj == LANES:
                dst[row : row + LANES] = flat[start : start + LANES]
            else:
                dst[row : row + LANES] = 0
                dst[row : row + nj] = flat[start : start + nj]
        return
    nd, nl = src.shape[1], src.shape[2]
    flat = src.reshape(-1)
    nj = min(LANES, nd - k * LANES)
    nt = nl - nl % 8 if nj == LANES else 0
    start = (b * nd + k * LANES) * nl
    for j0 in range(0, LANES, 8):
        for t0 in range(0, nt, 8):
            _transpose8(flat, start + j0 * nl + t0, nl, dst, base + t0 * LANES + j0, LANES)
    for j in range(LANES):
        for t in range(nt, nl):
            dst[base + t * LANES + j] = flat[start + j * nl + t] if j < nj else 0


@njit(inline="always")
def _from_rows(src, base, tm, rev, dst, b, k, add=False):
    """Lanes → channels, the inverse of _to_rows for the channels that exist: dst[b, k·LANES + j, t]
    (dst[b, t, k·LANES + j] when tm) = src[base + t·LANES + j], row L − 1 − t when rev; += when add (tm only)."""
    if tm:
        nl, nd = dst.shape[1], dst.shape[2]
        nj = min(LANES, nd - k * LANES)
        flat = dst.reshape(-1)
        for t in range(nl):
            row = base + (nl - 1 - t if rev else t) * LANES
            start = (b * nl + t) * nd + k * LANES
            if add:  # a loop: 28 ns a row of 64 where numba's slice += took 40
                for j in range(nj):
                    flat[start + j] += src[row + j]
            else:
                flat[start : start + nj] = src[row : row + nj]
        return
    nd, nl = dst.shape[1], dst.shape[2]
    flat = dst.reshape(-1)
    nj = min(LANES, nd - k * LANES)
    nt = nl - nl % 8 if nj == LANES else 0
    start = (b * nd + k * LANES) * nl
    for j0 in range(0, LANES, 8):
        for t0 in range(0, nt, 8):
            _transpose8(src, base + t0 * LANES + j0, LANES, flat, start + j0 * nl + t0, nl)
    for j in range(nj):
        for t in range(nt, nl):
            flat[start + j * nl + t] = src[base + t * LANES + j]


@njit(inline="always")
def _load_params(A, Dv, bias, ps, g, k):
    """Block k's parameters as lanes, zeros past D: ps[g, n] = A[k·LANES + j, n]·log₂e for n < N (the
    decays are computed as powers of 2), then the rows D_SKIP (Dv), BIAS (bias) and A_ROWS + n (A)."""
    nd, nn = A.shape
    nj = min(LANES, nd - k * LANES)
    for n in range(nn):
        for j in range(LANES):
            a = A[k * LANES + j, n] if j < nj else 0
            ps[g, n, j] = a * _LOG2E
            ps[g, nn + A_ROWS + n, j] = a
    for j in range(LANES):
        ps[g, nn + D_SKIP, j] = Dv[k * LANES + j] if j < nj else 0
        ps[g, nn + BIAS, j] = bias[k * LANES + j] if j < nj else 0


@njit(inline="always")
def _states(ps):
    """N, from the parameter scratch's 2N + 2 rows."""
    return (ps.shape[1] - 2) // 2


@njit(inline="always")
def _load_block(su, sd, base, direct, d_direct, rev, softplus, dt, dtu, ps, g, b, k, nd):
    """dt[g] = softplus?(delta + bias) (bias: ps, see _load_params), dtu[g] = dt·u for batch b, block k; the
    rows of u and delta where _row_at finds them (u's by direct, delta's by d_direct; gathered: u's at base,
    delta's L rows after; nd: D)."""
    nl = dt.shape[1]
    nn = _states(ps)
    for t in range(nl):
        ru = _row_at(direct, b, k, t, nl, nd, rev, base)
        rd = _row_at(d_direct, b, k, t, nl, nd, rev, base + nl * LANES)
        ur, dr = su[ru : ru + LANES], sd[rd : rd + LANES]
        for j in range(LANES):
            x = dr[j] + ps[g, nn + BIAS, j]
            sp = _softplus(x)
            dt[g, t, j] = sp if softplus else x
            dtu[g, t, j] = (sp if softplus else x) * ur[j]


@njit(inline="always")
def _row_at(direct, b, k, t, nl, nd, rev, base):
    """Where row t (scan order) of batch b, block k starts: in the B×L×D array itself when direct (position
    L − 1 − t when rev), else in rows of LANES gathered at base (see _to_rows)."""
    if direct:
        return (b * nl + (nl - 1 - t if rev else t)) * nd + k * LANES
    return base + t * LANES


_LOW_RANK_ROWS = 4
"""Positions _low_rank_rows computes at once."""


@intrinsic
def _low_rank_rows(typingctx, lr, at, at_step, w, base, stride, nr, out, orow, nq):
    """out[orow + q·LANES + j] = Σ_{r < nr} lr[at + q·at_step + r]·w[base + r·stride + j] for j < LANES and
    q < nq ≤ _LOW_RANK_ROWS, by FMAs from zero in r order, in explicit vectors (the sums stay in registers):
    Δ of up to _LOW_RANK_ROWS positions for a block of channels from its rank-R projection. Several positions
    at once share each load of w and give the FMAs independent chains (one position's 24 chained FMAs left
    the units idle); each value is the same sum in the same order. (With nq < _LOW_RANK_ROWS the last
    position is computed and stored more than once.) All 1-d contiguous float32; no bounds checks."""
    if {lr, w} - set(_FLAT) or out != _FLAT[0]:
        return None

    def codegen(context, builder, signature, args):
        at, at_step, base, stride, nr, orow, nq = args[1], args[2], args[4], args[5], args[6], args[8], args[9]
        v = _Vectors(context, builder, signature, args)
        last = builder.sub(nq, ir.Constant(nq.type, 1))
        qs = [builder.select(builder.icmp_signed("<", ir.Constant(nq.type, q), nq), ir.Constant(nq.type, q), last)
              for q in range(_LOW_RANK_ROWS)]  # fmt: skip
        starts = [builder.add(at, builder.mul(at_step, q)) for q in qs]

        parts = len(_PARTS)

        def rank(r, acc):  # acc: the sums of position 0's vectors, then position 1's, …
            wr = v.row(3, builder.add(base, builder.mul(r, stride)))
            c = [v.splat(0, builder.add(start, r)) for start in starts]
            return [v.fma(c[i // parts], wr[i % parts], a) for i, a in enumerate(acc)]

        sums = v.state_loop(nr, [ir.Constant(v.vty, None)] * (parts * _LOW_RANK_ROWS), rank)
        for i, q in enumerate(qs):
            at_row = builder.add(orow, builder.mul(q, ir.Constant(q.type, LANES)))
            v.store_row(sums[i * parts : (i + 1) * parts], 7, at_row)
        return context.get_dummy_value()

    ints = [types.intp] * 3
    return types.void(lr, types.intp, types.intp, w, *ints, out, types.intp, types.intp), codegen


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def scan_forward(u, delta, z, tm, revs, A, Bm, Cm, Dv, bias, softplus, has_z, out, counter, xs, dt, dtu, ys, h, ps,
                 x_dbl, dt_w):  # fmt: skip
    """out = Σ_p (Σ_n C·h + D·u)·silu(z) over P scan directions p, each with its own u[p], delta[p], A[p] (D×N),
    Bm[p], Cm[p], Dv[p], bias[p] (D,), x_dbl[p] and dt_w[p], and scanning from the last position to the first
    when revs[p] (a Vim mixer's two directions in one call: P = 2, revs = (False, True)). Arrays as B×D×L, or
    B×L×D when tm; Bm[p], Cm[p] in scan order (reversed along L when revs[p]). A task (batch, block of
    channels) runs the directions one after another: the first writes out, each next one adds its rows to it
    (y₀ + y₁: what adding the outputs of separate calls gives). P > 1 needs tm.

    With dt_w[p] of R > 0 rows (R × whole blocks of channels, zero-padded; tm only) delta, Bm and Cm are not
    read but x_dbl[p] (B×L×(R+2N), x_proj's output in sequence order): Δ before its bias is computed here from
    its first R columns (_low_rank_rows: what dt_proj's product gives, up to its summation order), and B and C
    are its next N columns and the N after them. Otherwise pass dt_w with no rows (x_dbl is then not read).

    A token-major block of LANES channels is read where it lies (its rows are LANES contiguous floats), and its
    output is written there by the first direction and added to there by the next ones (_advance's add);
    other blocks (B×D×L, or the ragged last one) are assembled in rows first (_to_rows) and scattered back
    (_from_rows): the same operations on the same values. Scratch per group g (G×…): xs 3×L×LANES (the
    gathered u, delta, z), dt = softplus?(delta + bias), dtu = dt·u (L×LANES), ys L×LANES, h N×LANES (the
    states, all N advanced together one step t at a time), ps (2N+2)×LANES (_load_params).
    """
    nb, nl = out.shape[0], dt.shape[1]
    ndir, nd, nn = A.shape
    nblk = (nd + LANES - 1) // LANES
    ntask = nb * nblk
    ngroup = h.shape[0]
    row = nl * LANES
    nr, nf = dt_w.shape[1], x_dbl.shape[3]
    z_flat, out_flat = z.reshape(-1), out.reshape(-1)
    xs_flat, ys_flat, h_flat = xs.reshape(-1), ys.reshape(-1), h.reshape(-1)
    dt_flat, dtu_flat = dt.reshape(-1), dtu.reshape(-1)
    ps_flat = ps.reshape(-1)
    for g in prange(ngroup):
        _full_width()
        task = _take(counter)
        while task < ntask:
            b = task // nblk
            k = task % nblk
            for p in range(ndir):
                rev = revs[p]
                lr_flat, w_flat, u_flat = x_dbl[p].reshape(-1), dt_w[p].reshape(-1), u[p].reshape(-1)
                bm_flat, cm_flat, bc_stride = ((lr_flat[nr:], lr_flat[nr + nn :], nf) if nr
                                               else (Bm[p].reshape(-1), Cm[p].reshape(-1), nn))  # fmt: skip
                _load_params(A[p], Dv[p], bias[p], ps, g, k)
                direct = tm and (k + 1) * LANES <= nd
                in_place = direct  # written (first direction) or added (next ones) where it lies, else assembled in ys
                if direct:
                    su, sd, sz = u_flat, delta[p].reshape(-1), z_flat
                else:
                    _to_rows(u[p], tm, rev, b, k, xs_flat, 3 * g * row)
                    if nr == 0:
                        _to_rows(delta[p], tm, rev, b, k, xs_flat, (3 * g + 1) * row)
                    if has_z:
                        _to_rows(z, tm, rev, b, k, xs_flat, (3 * g + 2) * row)
                    su, sd, sz = xs_flat, xs_flat, xs_flat
                so = out_flat if in_place else ys_flat
                if nr:  # Δ into the rows a gathered delta takes, then read from there
                    for t in range(0, nl, _LOW_RANK_ROWS):
                        _low_rank_rows(lr_flat, (b * nl + (nl - 1 - t if rev else t)) * nf, -nf if rev else nf, w_flat,
                                       k * LANES, dt_w.shape[2], nr, xs_flat, (3 * g + 1) * row + t * LANES,
                                       min(_LOW_RANK_ROWS, nl - t))  # fmt: skip
                    sd = xs_flat
                _load_block(su, sd, 3 * g * row, direct, direct and nr == 0, rev, softplus, dt, dtu, ps, g, b, k, nd)
                for n in range(nn):
                    for j in range(LANES):
                        h[g, n, j] = 0
                hrow, arow = g * nn * LANES, g * ps.shape[1] * LANES
                for t in range(nl):  # y = (D·u + the states' sum)·silu(z), in registers
                    ru = _row_at(direct, b, k, t, nl, nd, rev, 3 * g * row)
                    ro = _row_at(in_place, b, k, t, nl, nd, rev, g * row)
                    dtrow, bcrow = (g * nl + t) * LANES, (b * nl + (nl - 1 - t if rev and nr else t)) * bc_stride
                    if has_z:
                        rz = _row_at(direct, b, k, t, nl, nd, rev, (3 * g + 2) * row)
                        _advance(dt_flat, dtu_flat, so, h_flat, ps_flat, bm_flat, cm_flat, dtrow, ro, hrow, hrow,
                                 arow, bcrow, nn, su, ru, sz, rz, in_place and p > 0)  # fmt: skip
                    else:
                        _advance(dt_flat, dtu_flat, so, h_flat, ps_flat, bm_flat, cm_flat, dtrow, ro, hrow, hrow,
                                 arow, bcrow, nn, su, ru, None, 0, in_place and p > 0)  # fmt: skip
                if not in_place:  # the first direction writes, the next ones add
                    _from_rows(ys_flat, g * row, tm, rev, out, b, k, p > 0)
            task = _take(counter)


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def scan_backward(
    u, delta, z, gout, tm, revs, A, Bm, Cm, Dv, bias, softplus, has_z,
    gu, gdelta, gz, gA, gB, gC, gD, gbias, counter,
    xs, dt, dtu, go, gy, gdec, ghb, yb, hs, gh, gacc, sums, ps,
):  # fmt: skip
    """Gradients of scan_forward for Q directions that read the same z and got the same ∂out (a Vim mixer's two:
    Q = 2, revs = (False, True)), reading the inputs again (full token-major blocks in place, the others gathered
    into xs: u, delta, z, gout) and recomputing the states. u, delta, A, Bm, Cm, Dv, bias and the gradients but
    gz: tuples of Q arrays, one per direction (scanning from the last position to the first when revs[q]). gout,
    gu, gdelta, gz in the layout of u (tm); gB, gC in scan order. ∂z is the directions' sum: the first direction
    writes gz, the next ones add to it (tm only). A task runs the directions one after another on each of its
    channel blocks, so the next ones find z and ∂out, and ∂z, in the caches.

    Tasks are (batch, part): part p owns blocks [p·K/P, (p+1)·K/P) and the partial sums gB[q][p], gC[q][p]
    (P×B×N×L; the first block of a part overwrites them). gA[q]: B×K×N×LANES and gD[q], gbias[q]: B×K×LANES
    are partial sums too. Scratch per group g (G×…; one array per role): xs 4×L×LANES, dt, dtu (see
    _load_block); L×LANES: go ∂out·silu'(z), gy ∂y, gdec Σ_n ∂/∂dt through the decay (then
    ∂delta), ghb Σ_n ∂h·B (then ∂u), yb y before the gate (then ∂z); hs (L+1)×N×LANES states;
    N×LANES: gh carried ∂h, gacc ∂A; sums 2×N: one position's Σ ∂y·h and Σ ∂h·dt·u (for gC, gB);
    ps (2N+2)×LANES (_load_params).
    """
    nb, nl = gz.shape[0], dt.shape[1]
    nd = A[0].shape[0]
    nblk = gA[0].shape[1]
    npart = gB[0].shape[0]
    ntask = nb * npart
    ngroup = hs.shape[0]
    row = nl * LANES
    gdec_flat, ghb_flat, yb_flat = gdec.reshape(-1), ghb.reshape(-1), yb.reshape(-1)
    z_flat, gout_flat = z.reshape(-1), gout.reshape(-1)
    xs_flat = xs.reshape(-1)
    for g in prange(ngroup):
        _full_width()
        task = _take(counter)
        while task < ntask:
            b = task // npart
            p = task % npart
            for k in range(p * nblk // npart, (p + 1) * nblk // npart):
                for q in range(len(u)):
                    rev = revs[q]
                    _load_params(A[q], Dv[q], bias[q], ps, g, k)
                    direct = tm and (k + 1) * LANES <= nd  # read in place (see scan_forward), else gathered
                    if direct:
                        su, sd, sz, sg = u[q].reshape(-1), delta[q].reshape(-1), z_flat, gout_flat
                    else:
                        _to_rows(u[q], tm, rev, b, k, xs_flat, 4 * g * row)
                        _to_rows(delta[q], tm, rev, b, k, xs_flat, (4 * g + 1) * row)
                        if has_z:
                            _to_rows(z, tm, rev, b, k, xs_flat, (4 * g + 2) * row)
                        _to_rows(gout, tm, rev, b, k, xs_flat, (4 * g + 3) * row)
                        su, sd, sz, sg = xs_flat, xs_flat, xs_flat, xs_flat
                    base = 4 * g * row
                    _load_block(su, sd, base, direct, direct, rev, softplus, dt, dtu, ps, g, b, k, nd)
                    _grad_in(has_z, su, sz, sg, base, direct, rev, go, gy, gdec, ghb, yb, ps, g, b, k, nd)
                    first = k == p * nblk // npart
                    _block_backward(Bm[q], Cm[q], gA[q], gB[q], gC[q], dt, dtu, gy, gdec, ghb, yb, hs, gh, gacc, sums,
                                    ps, g, b, k, p, first)  # fmt: skip
                    _block_finish(softplus, su, sd, base, direct, rev, gD[q], gbias[q], dt, go, gy, gdec, ghb, yb, ps,
                                  g, b, k, nd)  # fmt: skip
                    _from_rows(gdec_flat, g * row, tm, rev, gdelta[q], b, k)
                    _from_rows(ghb_flat, g * row, tm, rev, gu[q], b, k)
                    if has_z:
                        _from_rows(yb_flat, g * row, tm, rev, gz, b, k, q > 0)
            task = _take(counter)


@njit(inline="always")
def _grad_in(has_z, su, sz, sg, base, direct, rev, go, gy, gdec, ghb, yb, ps, g, b, k, nd):
    """gy = ∂out·silu(z), go = ∂out·silu'(z) (when has_z, else both ∂out); gdec, ghb zeroed, yb = D·u. The
    rows of u, z and ∂out where _row_at finds them (gathered: at base, 2 and 3 times L rows after)."""
    nl = go.shape[1]
    nn = _states(ps)
    for t in range(nl):
        ru = _row_at(direct, b, k, t, nl, nd, rev, base)
        rz = _row_at(direct, b, k, t, nl, nd, rev, base + 2 * nl * LANES)
        rg = _row_at(direct, b, k, t, nl, nd, rev, base + 3 * nl * LANES)
        ur, zr, gr = su[ru : ru + LANES], sz[rz : rz + LANES], sg[rg : rg + LANES]
        for j in range(LANES):
            zv, gov = zr[j] if has_z else _F1, gr[j]
            s = _sigmoid(zv)
            gy[g, t, j] = gov * zv * s if has_z else gov
            go[g, t, j] = gov * s * (_F1 + zv * (_F1 - s)) if has_z else gov
            gdec[g, t, j] = 0
            ghb[g, t, j] = 0
            yb[g, t, j] = ps[g, nn + D_SKIP, j] * ur[j]


@njit(inline="always")
def _block_backward(Bm, Cm, gA, gB, gC, dt, dtu, gy, gdec, ghb, yb, hs, gh, gacc, sums, ps, g, b, k, p, first):
    """Recurrence gradients for batch b, channel block k: adds to gdec[g], ghb[g], yb[g]; fills
    gA[b, k] and gB[p, b], gC[p, b].

    Both passes run time outer, state index inner (as scan_forward does), so the rows of one position
    stay in L1 while all N states use them; the states of every position are stored (hs[t + 1]: N×LANES,
    hs[0] = 0), and the sums run in the same order as a state-by-state pass would. The decays are
    recomputed in the second pass rather than stored: with _vec_exp2 that is cheaper than reading them back
    (the backward 1.07–1.09× as fast, A/B).
    """
    nl, nn = dt.shape[1], _states(ps)
    for n in range(nn):
        for j in range(LANES):
            hs[g, 0, n, j] = 0
            gh[g, n, j] = 0
            gacc[g, n, j] = 0
    gy_f, dt_f, dtu_f, gdec_f = gy.reshape(-1), dt.reshape(-1), dtu.reshape(-1), gdec.reshape(-1)
    ghb_f, hs_f, gh_f, gacc_f = ghb.reshape(-1), hs.reshape(-1), gh.reshape(-1), gacc.reshape(-1)
    ps_f, bm_f, cm_f, sums_f = ps.reshape(-1), Bm.reshape(-1), Cm.reshape(-1), sums.reshape(-1)
    yb_f = yb.reshape(-1)
    for t in range(nl):
        hrow = (g * (nl + 1) + t) * nn * LANES
        row = (g * nl + t) * LANES
        _advance(dt_f, dtu_f, yb_f, hs_f, ps_f, bm_f, cm_f, row, row, hrow, hrow + nn * LANES,
                 g * ps.shape[1] * LANES, (b * nl + t) * nn, nn, None, 0, None, 0, 0)  # fmt: skip
    for t in range(nl - 1, -1, -1):
        _retreat(gy_f, dt_f, dtu_f, gdec_f, ghb_f, hs_f, gh_f, gacc_f, ps_f, bm_f, cm_f, sums_f,
                 (g * nl + t) * LANES, (g * (nl + 1) + t) * nn * LANES, g * nn * LANES, g * ps.shape[1] * LANES,
                 (b * nl + t) * nn, g * 2 * nn, nn)  # fmt: skip
        for n in range(nn):
            gC[p, b, n, t] = sums[g, 0, n] if first else gC[p, b, n, t] + sums[g, 0, n]
            gB[p, b, n, t] = sums[g, 1, n] if first else gB[p, b, n, t] + sums[g, 1, n]
    for n in range(nn):
        for j in range(LANES):
            gA[b, k, n, j] = gacc[g, n, j]


@njit(inline="always")
def _block_finish(softplus, su, sd, base, direct, rev, gD, gbias, dt, go, gy, gdec, ghb, yb, ps, g, b, k, nd):
    """In place: gdec → ∂delta, ghb → ∂u, yb → ∂z for batch b, block k; partial sums gD[b, k],
    gbias[b, k]. u and delta read as in _load_block."""
    nl = dt.shape[1]
    nn = _states(ps)
    for j in range(LANES):
        gD[b, k, j] = 0
        gbias[b, k, j] = 0
    for t in range(nl):
        ru = _row_at(direct, b, k, t, nl, nd, rev, base)
        rd = _row_at(direct, b, k, t, nl, nd, rev, base + nl * LANES)
        ur, dr = su[ru : ru + LANES], sd[rd : rd + LANES]
        for j in range(LANES):
            uv, gyv, hb = ur[j], gy[g, t, j], ghb[g, t, j]
            gdt = _fma(hb, uv, gdec[g, t, j])
            gdl = gdt * _sigmoid(dr[j] + ps[g, nn + BIAS, j])
            gdec[g, t, j] = gdl if softplus else gdt
            ghb[g, t, j] = _fma(hb, dt[g, t, j], gyv * ps[g, nn + D_SKIP, j])
            yb[g, t, j] = go[g, t, j] * yb[g, t, j]
            gD[b, k, j] = _fma(gyv, uv, gD[b, k, j])
            gbias[b, k, j] += gdl if softplus else gdt


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def conv_forward(x, wt, bias, revs, silu, out):
    """Depthwise convs along L of token-major x (B×L×D), one per direction p < P (a Vim mixer's two in one
    pass over x): taps wt[p] (K×D) and bias[p] (D,), into out[p] (B×L×D):
    out[p, b, t] = act(bias[p] + Σ_k wt[p, k]·x[b, t − K + 1 + k]) (causal), or with x[b, t + K − 1 − k]
    when revs[p] (the causal conv of the flipped sequence, flipped back); positions outside [0, L) read zeros.
    act: SiLU when silu, else none. Every inner loop runs over D contiguous channels."""
    nb, nl, nd = x.shape
    ndir, nk = wt.shape[0], wt.shape[1]
    for task in prange(nb * nl):
        _full_width()
        b, t = task // nl, task % nl
        for p in range(ndir):
            o = out[p, b, t]
            for d in range(nd):
                o[d] = bias[p, d]
            for k in range(nk):
                s = t + nk - 1 - k if revs[p] else t - nk + 1 + k
                if 0 <= s < nl:
                    for d in range(nd):
                        o[d] = _fma(wt[p, k, d], x[b, s, d], o[d])
            if silu:
                for d in range(nd):
                    v = o[d]
                    o[d] = v * _sigmoid(v)


def record_scratch() -> tuple[tuple[int, ...], ...]:
    """delta_record's scratch per group: one row of sums per position _low_rank_rows computes at once."""
    return ((_LOW_RANK_ROWS * LANES,),)


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def delta_record(x_dbl, dt_w, bias, out, counter, sums):
    """out[p, b, t, d] = softplus(Σ_r x_dbl[p, b, t, r]·dt_w[p, r, d] + bias[p, d]) for d < D (out: P×B×L×D), from
    x_proj's outputs x_dbl (P×B×L×(R+2N)) and dt_w (P×R×D', scan_forward's): the Δ scan_forward computes from them,
    by the same steps (_low_rank_rows, the bias, _softplus), for a recording mixer. A task is a direction's next
    _LOW_RANK_ROWS positions, all blocks of channels; sums: record_scratch's per group (G×…)."""
    ndir, nb, nl, nf = x_dbl.shape
    nd, nr, ndp = out.shape[3], dt_w.shape[1], dt_w.shape[2]
    npos = nb * nl
    nchunk = (npos + _LOW_RANK_ROWS - 1) // _LOW_RANK_ROWS
    for g in prange(sums.shape[0]):
        _full_width()
        task = _take(counter)
        while task < ndir * nchunk:
            p, pos = task // nchunk, task % nchunk * _LOW_RANK_ROWS
            nq = min(_LOW_RANK_ROWS, npos - pos)
            lr, w, o, s = x_dbl[p].reshape(-1), dt_w[p].reshape(-1), out[p].reshape((npos, nd)), sums[g]
            for k in range(ndp // LANES):
                _low_rank_rows(lr, pos * nf, nf, w, k * LANES, ndp, nr, s, 0, nq)
                for q in range(nq):
                    for j in range(min(LANES, nd - k * LANES)):
                        o[pos + q, k * LANES + j] = _softplus(s[q * LANES + j] + bias[p, k * LANES + j])
            task = _take(counter)


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def conv_backward(x, wt, bias, rev, silu, gout, chunk, add_gx, ga, gx, gw, gbias):
    """Gradients of conv_forward: gx (B×L×D; added to it with add_gx, as for another direction's conv of the
    same x) and per-task partial sums gw (P×K×D) and gbias (P×D), task p covering batch p // C, rows
    [(p % C)·chunk, …) of L (C = ⌈L / chunk⌉ tasks per image). ga (B×L×D scratch) receives
    ∂/∂(pre-activation)."""
    nb, nl, nd = x.shape
    nk = wt.shape[0]
    nchunk = (nl + chunk - 1) // chunk
    for task in prange(nb * nl):  # ga = gout·act'(a), a recomputed
        _full_width()
        b, t = task // nl, task % nl
        if not silu:
            for d in range(nd):
                ga[b, t, d] = gout[b, t, d]
            continue
        for d in range(nd):
            ga[b, t, d] = bias[d]
        for k in range(nk):
            s = t + nk - 1 - k if rev else t - nk + 1 + k
            if 0 <= s < nl:
                for d in range(nd):
                    ga[b, t, d] = _fma(wt[k, d], x[b, s, d], ga[b, t, d])
        for d in range(nd):
            a = ga[b, t, d]
            sg = _sigmoid(a)
            ga[b, t, d] = gout[b, t, d] * sg * (_F1 + a * (_F1 - sg))
    for task in prange(nb * nchunk):
        _full_width()
        b, c = task // nchunk, task % nchunk
        for d in range(nd):
            gbias[task, d] = 0
        for k in range(nk):
            for d in range(nd):
                gw[task, k, d] = 0
        for s in range(c * chunk, min(nl, (c + 1) * chunk)):
            if not add_gx:
                for d in range(nd):
                    gx[b, s, d] = 0
            for d in range(nd):
                gbias[task, d] += ga[b, s, d]
            for k in range(nk):
                t = s - nk + 1 + k if rev else s + nk - 1 - k  # the output row that read x[s] through tap k
                if 0 <= t < nl:
                    for d in range(nd):
                        gx[b, s, d] = _fma(wt[k, d], ga[b, t, d], gx[b, s, d])
                        gw[task, k, d] = _fma(ga[b, t, d], x[b, s, d], gw[task, k, d])


@njit(inline="always")
def _lane_dot(x, y, acc):
    """Σ_c x[c]·y[c] over a row (1-d, C floats) in float32: FMAs into LANES partial sums (acc: LANES scratch),
    then _lane_sum's fixed tree, so the same order wherever it is called."""
    nc = x.shape[0]
    full = nc - nc % LANES
    acc[:] = 0
    for c0 in range(0, full, LANES):
        for j in range(LANES):
            acc[j] = _fma(x[c0 + j], y[c0 + j], acc[j])
    for c in range(full, nc):
        acc[c - full] = _fma(x[c], y[c], acc[c - full])
    return _lane_sum(acc, 0)


@njit(inline="always")
def _rms_scale(x, acc, eps):
    """1 / sqrt(mean(x²) + eps) of a row x: what add_rms_norm scales by and its backward differentiates."""
    return _F1 / np.sqrt(_lane_dot(x, x, acc) / np.float32(x.shape[0]) + eps)


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def add_rms_norm(hidden, residual, has_residual, weight, eps, chunk, out_res, out_norm):
    """Per row r of C channels (all arrays R×C but weight (C,)): out_res[r] = residual[r] + hidden[r]
    (hidden[r] alone unless has_residual); out_norm[r] = out_res[r] / sqrt(mean(out_res[r]²) + eps) · weight.
    Tasks of ``chunk`` rows; squares are summed by _lane_dot."""
    nr, nc = hidden.shape
    for task in prange((nr + chunk - 1) // chunk):
        _full_width()
        acc = np.empty(LANES, np.float32)
        for r in range(task * chunk, min(nr, (task + 1) * chunk)):
            for c in range(nc):
                out_res[r, c] = residual[r, c] + hidden[r, c] if has_residual else hidden[r, c]
            scale = _rms_scale(out_res[r], acc, eps)
            for c in range(nc):
                out_norm[r, c] = out_res[r, c] * scale * weight[c]


@njit(parallel=True, fastmath=False, error_model="numpy", cache=True)
def add_rms_norm_backward(res, weight, eps, g_norm, g_res, has_g_res, chunk, g_in, g_w):
    """Gradients of add_rms_norm from its saved out_res (``res``, R×C): with s = _rms_scale(res[r]) (the
    forward's s) and x̂ = res[r]·s, g_in[r] = s·(g_norm[r]·weight) − res[r]·s³·Σ_c(g_norm·weight·res)[r] / C
    (+ g_res[r] when has_g_res: the residual output's own gradient), the gradient of both summands; g_w: per
    task of ``chunk`` rows the partial sums Σ_r g_norm[r]·x̂[r] (tasks × C)."""
    nr, nc = res.shape
    for task in prange((nr + chunk - 1) // chunk):
        _full_width()
        acc, gw = np.empty(LANES, np.float32), np.empty(nc, np.float32)
        for c in range(nc):
            g_w[task, c] = 0
        for r in range(task * chunk, min(nr, (task + 1) * chunk)):
            x = res[r]
            for c in range(nc):
                gw[c] = g_norm[r, c] * weight[c]
            scale = _rms_scale(x, acc, eps)
            k = scale * scale * scale * _lane_dot(gw, x, acc) / np.float32(nc)
            for c in range(nc):
                g = scale * gw[c] - x[c] * k
                g_in[r, c] = g + g_res[r, c] if has_g_res else g
                g_w[task, c] = _fma(g_norm[r, c], x[c] * scale, g_w[task, c])


@intrinsic
def _packed_product(typingctx, gemm, a, packed, out, rows, n, k):
    """out (rows×n, row-major) = a (rows×k, row-major) @ a weight packed by MKL for this product
    (rmeeto.ops.packed), by MKL's cblas_sgemm_compute at address ``gemm``: the same call PackedLinear makes from
    Python. The address comes in as an argument because a kernel that holds a ctypes function is never cached on
    disk (numba treats it as a dynamic global). a, packed and out: contiguous arrays, any number of dimensions."""
    i32, f32, ptr = ir.IntType(32), ir.FloatType(), ir.IntType(8).as_pointer()
    sig = types.void(types.intp, a, packed, out, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        fn = ir.FunctionType(ir.VoidType(), [i32] * 6 + [ptr, i32, ptr, i32, f32, ptr, i32])
        call = builder.inttoptr(args[0], fn.as_pointer())

        def data(i):
            return builder.bitcast(context.make_array(signature.args[i])(context, builder, args[i]).data, ptr)

        def const(v):
            return ir.Constant(i32, v)

        m, n, k = (builder.trunc(v, i32) for v in args[4:])
        builder.call(call, [const(ROW_MAJOR), const(NO_TRANS), const(PACKED), m, n, k, data(1), k, data(2), n,
                            ir.Constant(f32, 0.0), data(3), n])  # fmt: skip
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _mixer_parts(rows, nc, nd, nf, ndir):
    """The floats of mixer_forward's intermediates, in the order they lie in ``work``: normed, xz, conv, x_dbl, y."""
    return rows * nc, 2 * rows * nd, ndir * rows * nd, ndir * rows * nf, rows * nd


@njit(inline="always")
def _lines(n):
    """n floats rounded up to whole 64-byte lines (16 floats)."""
    return -(-n // 16) * 16


@njit(cache=True)
def mixer_work(rows, nc, nd, nf, ndir):
    """The floats mixer_forward's ``work`` takes for B·L = rows, C = nc, Dᵢ = nd, R+2N = nf and P = ndir."""
    total = 0
    for n in _mixer_parts(rows, nc, nd, nf, ndir):
        total += _lines(n)
    return total


@njit(cache=True)
def mixer_x_dbl(rows, nc, nd, nf, ndir):
    """Where mixer_forward leaves x_proj's outputs (x_dbl, P×B·L×(R+2N)) in ``work``: (first float, floats)."""
    n_normed, n_xz, n_conv, n_x_dbl, _ = _mixer_parts(rows, nc, nd, nf, ndir)
    return _lines(n_normed) + _lines(n_xz) + _lines(n_conv), n_x_dbl


@njit(fastmath=False, error_model="numpy", cache=True)
def mixer_forward(gemm, add_norm, hidden, residual, has_residual, norm_w, eps, chunk, summed, in_x, in_z, x_proj,
                  out_proj, taps, conv_b, revs, A, Dv, bias, dt_w, work, counter, xs, dt, dtu, ys, h, ps,
                  out):  # fmt: skip
    """A Vim mixer's forward without gradients with its products' weights packed for MKL (rmeeto.frozen), in one
    call: out (B×L×C) = out_proj(scan(conv(in_proj_x(x)), in_proj_z(x))) for x B×L×C, what mamba_inner_cpu
    between PackedLinear products computes, the same operations in the same order. x is hidden; or with
    ``add_norm``, a Vim block's add + RMSNorm first (add_rms_norm): summed = residual + hidden (hidden alone unless
    has_residual), x = normed = RMSNorm(summed)·norm_w (all B×L×C; otherwise not read).

    in_x, in_z: in_proj's halves packed for B·L rows; x_proj: a tuple of P such copies of x_proj's weights, one per
    direction; out_proj likewise (with the halving in it). work (1-d, mixer_work's floats, 64-byte aligned) takes
    the intermediates, each from a line: normed (B×L×C), xz (2×B×L×Dᵢ: x, then z), conv (P×B×L×Dᵢ), x_dbl
    (P×B×L×(R+2N)) and y (B×L×Dᵢ); one buffer, not five, as each array handed over costs Python steps at every
    call (docs/cpu_speed.md, round 15). The other arrays are scan_forward's (token-major).
    gemm: rmeeto.ops.packed.COMPUTE_ADDRESS."""
    nb, nl, nc = hidden.shape
    ndir, nd, nn = A.shape
    rows, nf = nb * nl, dt_w.shape[1] + 2 * nn
    n_normed, n_xz, n_conv, n_x_dbl, n_y = _mixer_parts(rows, nc, nd, nf, ndir)
    at = 0
    normed = work[at : at + n_normed].reshape((nb, nl, nc))
    at += _lines(n_normed)
    xz = work[at : at + n_xz].reshape((2, nb, nl, nd))
    at += _lines(n_xz)
    conv = work[at : at + n_conv].reshape((ndir, nb, nl, nd))
    at += _lines(n_conv)
    x_dbl = work[at : at + n_x_dbl].reshape((ndir, nb, nl, nf))
    at += _lines(n_x_dbl)
    y = work[at : at + n_y].reshape((nb, nl, nd))
    x = hidden
    if add_norm:
        flat = (rows, nc)
        add_rms_norm(hidden.reshape(flat), residual.reshape(flat), has_residual, norm_w, eps, chunk,
                     summed.reshape(flat), normed.reshape(flat))  # fmt: skip
        x = normed
    _packed_product(gemm, x, in_x, xz[0], rows, nd, nc)
    _packed_product(gemm, x, in_z, xz[1], rows, nd, nc)
    conv_forward(xz[0], taps, conv_b, revs, True, conv)
    for p in range(len(x_proj)):
        _packed_product(gemm, conv[p], x_proj[p], x_dbl[p], rows, nf, nd)
    scan_forward(conv, conv, xz[1], True, revs, A, x_dbl, x_dbl, Dv, bias, True, True, y, counter, xs, dt, dtu, ys,
                 h, ps, x_dbl, dt_w)  # fmt: skip
    _packed_product(gemm, y, out_proj, out, rows, nc, nd)
