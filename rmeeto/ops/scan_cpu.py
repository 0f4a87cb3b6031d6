"""`cpu` backend: fused numba selective scan (forward and backward), causal conv, and residual add +
RMSNorm (available only if numba imports).

Threads: numba prefers its OpenMP layer here, then ``workqueue``, then tbb (unless NUMBA_THREADING_LAYER
is set). That layer's GOMP_* calls bind to the first OpenMP runtime in the process's global scope, which
with PyTorch's wheels is torch's own bundled libgomp (torch loads it globally, before numba's layer loads
its system copy): numba's kernels and torch's operations then run on one thread pool, with torch's wait
policy (a worker spins some ms after each parallel region, then sleeps), so they do not fight over the
cores (checked with LD_DEBUG=bindings and per-thread CPU time, docs/cpu_speed.md, round 11). ``workqueue``
is a second pool: the scans of a Vim-S forward ran ~1.4× slower with it on a 2-core machine. That runtime
is not fork-safe: a process forked after the scan ran here must not run it again (numba stops it with a
message); set NUMBA_THREADING_LAYER=workqueue for such uses. Kernel calls are serialised by a lock (the
layers are not re-entrant) and use torch.get_num_threads() threads.

torch.compile cannot trace into numba, so the public entry points are opaque to it
(torch.compiler.disable, 0.3 µs a call): a compiled model runs them eagerly between its graphs.
"""

import math
import os
import threading
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import packed
from .common import wants_grad
from .conv import conv_weight
from .packed import PackedLinear
from .workspace import Workspace, active, kept

try:
    import numba

    from . import cpu_kernels as _k
except ImportError:  # numba missing or broken: the backend is simply unavailable
    numba = _k = None

AVAILABLE = _k is not None
_LOCK = threading.Lock()
_LOCAL = threading.local()  # .threads: the count numba was last given on this thread

if AVAILABLE and "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]


def _param(x: Tensor | None, nd: int) -> np.ndarray:
    """A per-channel parameter (D×N, or (D,)) as the kernels read it: contiguous fp32 (zeros when None)."""
    return np.zeros(nd, np.float32) if x is None else x.detach().contiguous().numpy()


def _threads() -> int:
    """Set numba's thread count (a per-thread setting) to torch's, capped, and return it; the first call
    starts the threads. numba is asked again only when the count changes (each ask took ~22 µs inside a Vim
    forward at batch 1). Starting numba's OpenMP layer sets the shared runtime's default count to
    NUMBA_NUM_THREADS (omp_set_num_threads), which is torch's count too: torch's is put back, else a user's
    torch.set_num_threads(1) would silently become all cores after the first scan."""
    torch_threads = torch.get_num_threads()
    n = min(torch_threads, numba.config.NUMBA_NUM_THREADS)
    if getattr(_LOCAL, "threads", None) != n:
        numba.set_num_threads(n)
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
        _LOCAL.threads = n
    return n


class _KernelLock:
    """``with kernel_lock as threads:`` around every numba kernel call of this package (this module's and the
    reducer's, rmeeto.reduction.merge_cpu): holds _LOCK (numba's threading layers are not re-entrant) and
    sets numba's thread count to torch's, which it gives. A class, not @contextmanager: a generator-based
    one cost 2.6 µs more a call, on a path a Vim at batch 1 takes some 150 times a forward."""

    def __enter__(self) -> int:
        _LOCK.acquire()
        try:
            return _threads()
        except BaseException:
            _LOCK.release()
            raise

    def __exit__(self, *exc: object) -> None:
        _LOCK.release()


kernel_lock = _KernelLock()


def _scan(u: Tensor, delta: Tensor, directions: list[tuple], z: Tensor | None, softplus: bool, pooled: bool = False
          ) -> tuple[Tensor, list[tuple]]:  # fmt: skip
    """Run the forward kernel for P directions that read the same z (fp32 CPU tensors; z may be None): u, delta
    P×B×D×L (token-major when P > 1), ``directions`` each one's (A, B, C, D, delta_bias, reverse), D and delta_bias
    may be None → (out: the directions' outputs summed, B×D×L; per direction what the backward kernel reads again:
    u, delta, z laid out, whether token-major, the kernel's A, B, C, D and bias arrays, reverse). pooled: out may
    come from the active workspace (no autograd will keep it)."""
    ndir, nb, nd, L = u.shape
    revs = [d[5] for d in directions]
    tm = ndir > 1 or revs[0] or token_major(u[0])
    u, delta, zl = (_layout(x, tm) for x in (u, delta, u[0] if z is None else z))
    arrays = [(_param(A, nd), *(_scan_order(x, rev) for x in (B, C)), _param(D, nd), _param(bias, nd))
              for A, B, C, D, bias, rev in directions]  # fmt: skip
    out = _new(zl, tm, pooled)
    with kernel_lock as threads:
        groups = scan_groups(threads, nb, nd)
        scratch = _scratch(_k.forward_scratch(L, arrays[0][0].shape[1]), groups)
        # P×… each: A, B, C, D, bias; one direction's as views (np.stack would copy them at every call)
        stacked = [np.stack(a) if ndir > 1 else a[0][None] for a in zip(*arrays, strict=True)]
        _k.scan_forward(_np_of(u, tm), _np_of(delta, tm), _np_of(zl, tm), tm, np.array(revs), *stacked, softplus,
                        z is not None, _np_of(out, tm), _counter(), *scratch, *_NO_LOW_RANK)  # fmt: skip
    return out, [(u[p], delta[p], zl, tm, arrays[p], revs[p]) for p in range(ndir)]


class _CpuScan(torch.autograd.Function):
    """Fused scan on fp32 CPU tensors; D, z, delta_bias may be None (see selective_scan_cpu)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool, reverse: bool) -> Tensor:
        out, [(u, delta, zl, ctx.tm, ctx.arrays, _)] = _scan(u[None], delta[None], [(A, B, C, D, delta_bias, reverse)],
                                                             z, softplus)  # fmt: skip
        ctx.save_for_backward(u, delta, zl)
        ctx.softplus, ctx.has_z, ctx.reverse = softplus, z is not None, reverse
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout: Tensor) -> tuple[Tensor | None, ...]:
        (grads,), g_z = _scan_grads([(*ctx.saved_tensors, ctx.tm, ctx.arrays, ctx.reverse)], ctx.softplus, ctx.has_z,
                                    gout)  # fmt: skip
        g_u, g_delta, g_A, g_B, g_C, g_D, g_bias = grads
        needs = ctx.needs_input_grad
        optional = (g_D if needs[5] else None, g_z if needs[6] else None, g_bias if needs[7] else None)
        return g_u, g_delta, g_A, g_B, g_C, *optional, None, None


def _scan_grads(saved: list[tuple], softplus: bool, has_z: bool, gout: Tensor, pooled: bool = False
                ) -> tuple[list[tuple], Tensor]:  # fmt: skip
    """The backward kernel, in one call, for what _scan saved for each of several directions that read the same z
    (u, delta, z laid out, tm, its arrays, and whether it scanned in reverse; more than one direction needs tm)
    and got the same ∂out (B×D×L) → ([(g_u, g_delta, g_A D×N, g_B, g_C B×N×L in sequence order, g_D, g_bias)
    per direction], g_z, the directions' summed ∂z). pooled: g_u and g_delta may come from the active workspace."""
    u, _, z, tm, arrays, _ = saved[0]
    nb, nd, L = gout.shape
    nn, lanes = arrays[0].shape[1], _k.LANES
    nblk = math.ceil(nd / lanes)
    gout = _layout(gout.float(), tm)
    g_u, g_delta = ([_new(u, tm, pooled) for _ in saved] for _ in range(2))
    g_z = _new(u, tm) if has_z else g_u[0]
    g_A = [gout.new_empty(nb, nblk, nn, lanes) for _ in saved]
    g_D, g_bias = ([gout.new_empty(nb, nblk, lanes) for _ in saved] for _ in range(2))
    with kernel_lock as threads:
        parts = min(nblk, math.ceil(8 * threads / nb))  # ≥ 8 tasks per thread where there are blocks
        groups = min(threads, nb * parts)
        g_B, g_C = ([gout.new_empty(parts, nb, nn, L) for _ in saved] for _ in range(2))
        scratch = _scratch(_k.backward_scratch(L, nn), groups)
        inputs = [tuple(_np_of(d[i], tm) for d in saved) for i in (0, 1)]
        per_direction = [tuple(a[i] for _, _, _, _, a, _ in saved) for i in range(len(arrays))]
        grads = [tuple(_np_of(x, tm) for x in g) for g in (g_u, g_delta)]
        sums = [tuple(x.numpy() for x in g) for g in (g_A, g_B, g_C, g_D, g_bias)]
        _k.scan_backward(*inputs, _np_of(z, tm), _np_of(gout, tm), tm, np.array([d[5] for d in saved]),
                         *per_direction, softplus, has_z, *grads, _np_of(g_z, tm), *sums, _counter(),
                         *scratch)  # fmt: skip
    out = []
    for q, (*_, reverse) in enumerate(saved):
        g_A_q = g_A[q].sum(0).transpose(0, 1).reshape(nn, nblk * lanes)[:, :nd].t()
        g_B_q, g_C_q = (g[q].sum(0).flip(-1) if reverse else g[q].sum(0) for g in (g_B, g_C))
        g_D_q, g_bias_q = (g[q].sum(0).reshape(-1)[:nd] for g in (g_D, g_bias))
        out.append((g_u[q], g_delta[q], g_A_q, g_B_q, g_C_q, g_D_q, g_bias_q))
    return out, g_z


def token_major(x: Tensor) -> bool:
    """x (B×D×L) is a transposed view of token-major (B×L×D) memory."""
    return x.stride(1) == 1 and x.shape[2] > 1


def _layout(x: Tensor, tm: bool) -> Tensor:
    """Detached …×D×L tensor → contiguous …×D×L, or (tm) a …×D×L view of contiguous …×L×D memory; copies
    only when x is not laid out so already."""
    x = x.detach()
    if tm:
        return x if x.transpose(-2, -1).is_contiguous() else x.transpose(-2, -1).contiguous().transpose(-2, -1)
    return x.contiguous()


def _new(like: Tensor, tm: bool, pooled: bool = False, count: int = 0) -> Tensor:
    """An empty B×D×L tensor like ``like`` (fp32), count×B×D×L when count, token-major when tm; from the active
    workspace when pooled and there is one (see rmeeto.ops.workspace)."""
    nb, nd, L = like.shape
    lead = (count,) if count else ()
    workspace = active() if pooled else None
    empty = like.new_empty if workspace is None else workspace.empty
    return empty(*lead, nb, L, nd).transpose(-2, -1) if tm else empty(*lead, nb, nd, L)


def _scan_order(x: Tensor, reverse: bool) -> np.ndarray:
    """B×N×L tensor → contiguous B×L×N array, reversed along L when ``reverse`` (one copy)."""
    x = x.detach().transpose(1, 2)
    return np.ascontiguousarray((x.flip(1) if reverse else x).numpy())


_SCRATCH = [np.empty(0, np.float32)]
"""The kernels' scratch memory, kept from call to call (fresh memory page-faults: see rmeeto.ops.workspace);
kernel calls are serialised by _LOCK and none keeps its scratch."""
_VIEWS: dict[tuple, list[np.ndarray]] = {}
"""_scratch's answers for the current _SCRATCH, by (shapes, groups): a Vim forward asks for the same few."""


def scan_groups(threads: int, nb: int, nd: int) -> int:
    """The forward scan's parallel groups for B = nb and Dᵢ = nd on ``threads`` threads: one per thread, at most one
    per task (an image's block of LANES channels)."""
    return min(threads, nb * math.ceil(nd / _k.LANES))


def _scratch(shapes: tuple[tuple[int, ...], ...], groups: int) -> list[np.ndarray]:
    """The kernels' per-group scratch arrays (groups × shape, fp32) in _SCRATCH, each starting on a 64-byte
    line: numpy puts a large array 16 bytes past one, so every 16-float vector access of it would span two
    lines (the scan forward ran 1.07× slower so, A/B). Call under _LOCK."""
    key = (shapes, groups)
    if key in _VIEWS:
        return _VIEWS[key]
    sizes = [groups * math.prod(shape) for shape in shapes]
    padded = [-(-n // 16) * 16 for n in sizes]  # each array takes whole lines of 16 floats
    if _SCRATCH[0].size < sum(padded) + 16:
        _SCRATCH[0] = np.empty(sum(padded) + 16, np.float32)
        _VIEWS.clear()  # views of the old buffer
    elif len(_VIEWS) > 256:  # many token counts seen (a merged model's, several models'): start afresh
        _VIEWS.clear()
    buf = _SCRATCH[0]
    start = (-buf.ctypes.data % 64) // 4
    out = []
    for n, room, shape in zip(sizes, padded, shapes, strict=True):
        out.append(buf[start : start + n].reshape(groups, *shape))
        start += room
    _VIEWS[key] = out
    return out


def _counter():
    """The kernels' shared task counter."""
    return np.zeros(1, np.int64)


def _np(tensors) -> list:
    return [x.numpy() for x in tensors]


def _np_of(x: Tensor, tm: bool) -> np.ndarray:
    """The kernels' view of a …×D×L tensor laid out by _layout / _new: …×L×D when tm."""
    return (x.transpose(-2, -1) if tm else x).numpy()


@torch.compiler.disable
def selective_scan_cpu(*args, reverse: bool = False) -> Tensor:  # ScanFn args, then reverse
    """Fused numba selective scan on CPU tensors (the ScanFn contract; fp32 inside).

    reverse: scan from the last position to the first, as scanning the flipped sequence and flipping the
    result back, without the flipped copies. Token-major inputs (B×D×L views of B×L×D memory, as a Vim
    mixer makes them) are read without copies and give a token-major output.
    """
    if not AVAILABLE:
        raise RuntimeError("the cpu selective-scan backend needs numba")
    *tensors, softplus = args
    tensors = [None if x is None else x.float() for x in tensors]
    if wants_grad(tensors):
        y = _CpuScan.apply(*tensors, bool(softplus), reverse)
    else:  # no graph to record: the kernel alone, without the autograd function's overhead
        u, delta, A, B, C, D, z, delta_bias = tensors
        y = _scan(u[None], delta[None], [(A, B, C, D, delta_bias, reverse)], z, bool(softplus), pooled=True)[0]
    return y.to(args[0].dtype)


def _conv(x: Tensor, directions: list[tuple], silu: bool, pooled: bool = False) -> tuple[Tensor, tuple]:
    """Run the conv's forward kernel for P directions of the same x (fp32 CPU tensors), ``directions`` each one's
    (weight, bias, reverse), bias may be None → (out P×B×D×L, token-major; what the backward kernel reads again:
    x laid out token-major, the P×K×D taps, the P×D biases). pooled: as for _scan."""
    x = _layout(x, True)
    taps = torch.stack([conv_weight(w).detach().t() for w, _, _ in directions])  # P×K×D
    b = torch.stack([torch.zeros(x.shape[1]) if bias is None else bias.detach() for _, bias, _ in directions])
    out = _new(x, True, pooled, len(directions))
    with kernel_lock:
        _k.conv_forward(_np_of(x, True), taps.numpy(), b.numpy(), np.array([rev for *_, rev in directions]), silu,
                        _np_of(out, True))  # fmt: skip
    return out, (x, taps, b)


class _CpuConv(torch.autograd.Function):
    """Depthwise causal conv (+ SiLU) on token-major fp32 CPU tensors (see causal_conv1d_cpu)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool, reverse: bool) -> Tensor:
        out, (x, taps, b) = _conv(x, [(weight, bias, reverse)], silu)
        ctx.save_for_backward(x, taps[0], b[0])
        ctx.silu, ctx.reverse, ctx.weight_shape, ctx.has_bias = silu, reverse, weight.shape, bias is not None
        return out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, gout: Tensor) -> tuple[Tensor | None, ...]:
        g_x, g_w, g_b = _conv_grads(*ctx.saved_tensors, ctx.silu, ctx.reverse, gout)
        return g_x, g_w.reshape(ctx.weight_shape), g_b if ctx.has_bias else None, None, None


def _conv_grads(x: Tensor, taps: Tensor, b: Tensor, silu: bool, reverse: bool, gout: Tensor,
                g_x: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The conv's backward kernel for what _conv saved (x token-major, the K×D taps, the bias) and ∂out (B×D×L)
    → (g_x token-major, g_w D×K, g_b); with ``g_x`` (token-major) ∂x is added to it (another direction's conv of
    the same x), which is returned."""
    nb, nd, L = x.shape
    parts = nb * math.ceil(L / _CONV_CHUNK)
    add_x = g_x is not None
    g_x = g_x if add_x else _new(x, True)
    g_w, g_b = x.new_empty(parts, taps.shape[0], nd), x.new_empty(parts, nd)
    with kernel_lock:
        (ga,) = _scratch(((nb, L, nd),), 1)  # ∂/∂(pre-activation), B×L×D: kept memory, not fresh pages each call
        _k.conv_backward(_np_of(x, True), taps.numpy(), b.numpy(), reverse, silu,
                         _np_of(_layout(gout.float(), True), True), _CONV_CHUNK, add_x, ga[0], _np_of(g_x, True),
                         g_w.numpy(), g_b.numpy())  # fmt: skip
    return g_x, g_w.sum(0).t(), g_b.sum(0)


_CONV_CHUNK = 32
"""Rows per task of the conv backward's weight-gradient partial sums."""


@torch.compiler.disable
def causal_conv1d_cpu(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None,
                      reverse: bool = False) -> Tensor:
    """causal_conv1d_torch's function by a numba kernel over token-major memory: x is a B×D×L view of
    B×L×D memory (copied there otherwise), and so is the result; fp32 inside, x's dtype out."""
    if not AVAILABLE:
        raise RuntimeError("the cpu causal-conv backend needs numba")
    tensors = [x.float(), weight.float(), None if bias is None else bias.float()]
    if wants_grad(tensors):
        return _CpuConv.apply(*tensors, activation is not None, reverse).to(x.dtype)
    xf, weight, bias = tensors
    return _conv(xf, [(weight, bias, reverse)], activation is not None, pooled=True)[0][0].to(x.dtype)


def _add_norm(hidden: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """add_rms_norm's kernel on fp32 CPU tensors (detached) → (normed, residual + hidden), hidden's shape."""
    pair = (hidden, hidden if residual is None else residual)  # the kernel ignores the second when there is no residual
    rows = [t.detach().reshape(-1, t.shape[-1]).contiguous() for t in pair]
    out_res, out_norm = torch.empty_like(rows[0]), torch.empty_like(rows[0])
    with kernel_lock:
        _k.add_rms_norm(*_np(rows), residual is not None, weight.detach().numpy(), np.float32(eps), _NORM_CHUNK,
                        out_res.numpy(), out_norm.numpy())  # fmt: skip
    return out_norm.view(hidden.shape), out_res.view(hidden.shape)


class _CpuAddNorm(torch.autograd.Function):
    """Residual add + RMSNorm with both outputs differentiable (see add_rms_norm_cpu); saves the sum only."""

    @staticmethod
    def forward(ctx, hidden: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        normed, out_res = _add_norm(hidden, residual, weight, eps)
        ctx.save_for_backward(out_res, weight)
        ctx.eps, ctx.has_residual = eps, residual is not None
        ctx.set_materialize_grads(False)  # an output not used gets None, not zeros (see backward)
        return normed, out_res

    @staticmethod
    @once_differentiable
    def backward(ctx, g_norm: Tensor | None, g_res: Tensor | None) -> tuple[Tensor | None, ...]:
        out_res, weight = ctx.saved_tensors
        if g_norm is None:  # only the sum was used: its gradient is both summands'
            g_in, g_w = g_res, None
        else:
            rows = out_res.reshape(-1, out_res.shape[-1])
            g_norm = g_norm.reshape(rows.shape).contiguous()
            g_other = g_norm if g_res is None else g_res.reshape(rows.shape).contiguous()  # read only when given
            g_in, g_w = torch.empty_like(rows), rows.new_empty(math.ceil(len(rows) / _NORM_CHUNK), rows.shape[1])
            with kernel_lock:
                _k.add_rms_norm_backward(rows.numpy(), weight.detach().numpy(), np.float32(ctx.eps), g_norm.numpy(),
                                         g_other.numpy(), g_res is not None, _NORM_CHUNK, g_in.numpy(),
                                         g_w.numpy())  # fmt: skip
            g_in, g_w = g_in.view(out_res.shape), g_w.sum(0) if ctx.needs_input_grad[2] else None
        return g_in, g_in if ctx.has_residual else None, g_w, None


@torch.compiler.disable
def add_rms_norm_cpu(hidden: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(normed, residual + hidden) in one pass over B×N×C fp32 tensors (hidden alone when residual is None):
    normed = RMSNorm(residual + hidden) · weight. Where gradients are wanted, an autograd function whose
    backward is one kernel pass too (a Vim-S block's add + norm, forward and backward, 3–4× as fast as the
    torch ops', docs/cpu_speed.md, round 13)."""
    if not AVAILABLE:
        raise RuntimeError("the cpu add + RMSNorm kernel needs numba")
    if wants_grad([hidden, residual, weight]):
        return _CpuAddNorm.apply(hidden, residual, weight, eps)
    return _add_norm(hidden, residual, weight, eps)


_NO_LOW_RANK = (np.zeros((1, 1, 1, 1), np.float32), np.zeros((1, 0, _k.LANES if AVAILABLE else 1), np.float32))
"""scan_forward's last two arguments when it reads Δ from its delta arrays."""

_NORM_CHUNK = 32
"""Rows per task of the add + RMSNorm kernel."""

_NO_NORM = np.ones(1, np.float32)
"""mixer_forward's norm weight when it runs no add + RMSNorm (not read)."""


class InnerParams(NamedTuple):
    """A mixer's directions' parameters as mamba_inner_cpu's kernels read them (prepare_inner), stacked along a
    first axis P (direction p scans backwards when revs[p]). Computed copies."""

    taps: np.ndarray  # P×K×Dᵢ conv taps
    conv_b: np.ndarray  # P×Dᵢ, zeros when the conv has no bias
    x_proj: tuple[PackedLinear, ...]  # P × x_proj's weight, (R+2N)×Dᵢ
    dt_w: np.ndarray  # P×R×Dᵢ' dt_proj's weight transposed, zero-padded to whole blocks of channels (Dᵢ' ≥ Dᵢ)
    dt_bias: np.ndarray  # P×Dᵢ
    A: np.ndarray  # P×Dᵢ×N
    D: np.ndarray  # P×Dᵢ
    revs: np.ndarray  # (P,) bool


def prepare_inner(*directions: tuple[Tensor | None, ...], pack: bool = False) -> InnerParams:
    """The parameters of a mixer's directions, each (conv_w Dᵢ×K or Dᵢ×1×K, conv_b, x_proj_w (R+2N)×Dᵢ,
    dt_proj_w Dᵢ×R, dt_bias, A Dᵢ×N, D; fp32; conv_b may be None), the first scanning forwards and the second,
    if any, backwards (a Vim mixer's), laid out for mamba_inner_cpu: some ten tensor operations a direction,
    each several µs inside a Vim, which a caller that knows the weights are fixed may do once
    (rmeeto.models.frozen), and then also pack x_proj's weights for MKL (``pack``; rmeeto.ops.packed)."""
    if not AVAILABLE:
        raise RuntimeError("the cpu mixer kernels need numba")
    if len(directions) not in (1, 2):
        raise ValueError(f"a mixer has one or two scan directions, got {len(directions)}")

    def one(conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D) -> tuple:
        nd = A.shape[0]
        dt_w = np.zeros((dt_proj_w.shape[1], -(-nd // _k.LANES) * _k.LANES), np.float32)
        dt_w[:, :nd] = dt_proj_w.detach().t().numpy()
        taps = conv_weight(conv_w).detach().t().contiguous().numpy()
        x_proj = PackedLinear(x_proj_w, pack=pack)
        return taps, _param(conv_b, nd), x_proj, dt_w, _param(dt_bias, nd), _param(A, nd), _param(D, nd)

    taps, conv_b, x_proj, dt_w, dt_bias, A, D = zip(*(one(*d) for d in directions), strict=True)
    return InnerParams(np.stack(taps), np.stack(conv_b), x_proj, np.stack(dt_w), np.stack(dt_bias),
                       np.stack(A), np.stack(D), np.array([False, True][: len(directions)]))  # fmt: skip


def mamba_inner_cpu(x: Tensor, z: Tensor, params: InnerParams, workspace: Workspace, x_dbl: Tensor | None = None
                    ) -> Tensor:  # fmt: skip
    """A Mamba mixer's scan directions for a forward without gradients, on the cpu kernels called directly:
    per direction conv + SiLU, x_proj, then the scan with dt_proj's product, Δ's bias and softplus, the D skip
    and the z gate (what mamba-ssm's mamba_inner_fn computes, out_proj aside) → the directions' y summed
    (forwards, then backwards: y_f + y_b), B×Dᵢ×L, token-major, in ``workspace``. x_proj's outputs go to
    ``x_dbl`` where given (P×B×L×(R+2N) fp32 contiguous, sequence order: dt, B, C, what a Δ record is made of).

    x, z: B×Dᵢ×L fp32 views of contiguous B×L×Dᵢ memory (token_major: L > 1); params: prepare_inner's. The
    same numbers as the general path (causal_conv1d, the linear layers and selective_scan with these
    arguments, and the sum of the directions) up to dt_proj's summation order, in far fewer tensor
    operations: inside a Vim each costs 4–15 µs (3–5× its cost in a tight loop), so at batch 1 the general
    path's dispatch and layout checks cost about as much as the kernels of a Vim-Ti (docs/cpu_speed.md, round
    5). dt_proj's rank-R product (K = R = 24 for Vim-S) ran at a third to half of the GEMM rate and wrote Δ out
    for the scan to read back; the scan computes it per row instead (merged Vim-S 1.09× at batch 1,
    docs/cpu_speed.md, round 8). Both directions go through one conv call and one scan call, which adds the
    second direction's rows to the first's output (docs/cpu_speed.md, round 10).
    """
    if not AVAILABLE:
        raise RuntimeError("the cpu mixer kernels need numba")
    nb, nd, L = x.shape
    ndir, nf = len(params.x_proj), params.x_proj[0].weight.shape[0]
    nn = params.A.shape[2]
    conv = workspace.empty(ndir, nb, L, nd)
    with kernel_lock:
        _k.conv_forward(x.transpose(1, 2).numpy(), params.taps, params.conv_b, params.revs, True, conv.numpy())
    if x_dbl is None:  # per direction B×L×(R+2N): dt, B, C, read by the scan where they lie
        x_dbl = workspace.empty(ndir, nb, L, nf)
    for p, x_proj in enumerate(params.x_proj):  # packed inside frozen: 1.3× one bmm's GFLOP/s at 131 rows
        x_proj(conv[p], x_dbl[p])
    out = workspace.empty(nb, L, nd)
    with kernel_lock as threads:
        groups = scan_groups(threads, nb, nd)
        conv_np, x_dbl_np = conv.numpy(), x_dbl.numpy()  # conv also stands for delta, x_dbl for B and C
        _k.scan_forward(conv_np, conv_np, z.transpose(1, 2).numpy(), True, params.revs, params.A, x_dbl_np, x_dbl_np,
                        params.D, params.dt_bias, True, True, out.numpy(), _counter(),
                        *_scratch(_k.forward_scratch(L, nn), groups), x_dbl_np, params.dt_w)  # fmt: skip
    return out.transpose(1, 2)


@torch.compiler.disable
def delta_record(x_dbl: Tensor, params: InnerParams) -> Tensor:
    """A recording mixer's Δ from x_proj's outputs x_dbl (P×B×L×(R+2N) fp32 contiguous, sequence order, as
    mamba_inner_cpu, mixer_cpu and block_cpu give them) → P×B×L×Dᵢ: softplus(dt·dt_projᵀ + bias) per direction,
    the values the scan computed from them, to the bit. One kernel pass: the same by tensor operations (a product,
    the bias, softplus) took 3 ms a recording mixer of a Vim-S at batch 8, a tenth of MTR's forward there."""
    if not AVAILABLE:
        raise RuntimeError("the cpu mixer kernels need numba")
    ndir, nb, L, _ = x_dbl.shape
    out = x_dbl.new_empty(ndir, nb, L, params.A.shape[1])
    with kernel_lock as threads:
        _k.delta_record(x_dbl.numpy(), params.dt_w, params.dt_bias, out.numpy(), _counter(),
                        *_scratch(_k.record_scratch(), threads))  # fmt: skip
    return out


@torch.compiler.disable
def mamba_inner_cpu_grad(x: Tensor, z: Tensor, *directions: tuple[Tensor | None, ...]) -> Tensor:
    """A Vim mixer's two scan directions with gradients, as one autograd node on the cpu kernels: x, z (B×Dᵢ×L
    fp32, token-major) and each direction's (conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D), forwards then
    backwards → y_f + y_b (B×Dᵢ×L, token-major). The forward runs the operations BiMamba._scan runs (the same
    bits); see _CpuInner for the backward."""
    if not AVAILABLE:
        raise RuntimeError("the cpu mixer kernels need numba")
    if len(directions) != 2:
        raise ValueError(f"mamba_inner_cpu_grad takes a Vim mixer's two scan directions, got {len(directions)}")
    return _CpuInner.apply(x, z, *directions[0], *directions[1])


class _CpuInner(torch.autograd.Function):
    """mamba_inner_cpu_grad. Per direction: conv + SiLU, x_proj, dt_proj's product and the scan; the directions'
    outputs summed. Both directions' convs are one kernel call and so are their scans, which adds the second
    direction's output to the first's (the same operations as a call per direction and an add, in fewer passes
    over memory: docs/cpu_speed.md, round 16). The backward gives the gradients of those operations, in fewer
    steps than autograd's graph of them: both directions' scan gradients come from one kernel call, which adds the
    second direction's ∂z into the first's while z and ∂out are still in the caches, the conv kernel adds the
    second direction's ∂x into the first's, and x_proj's input gradient goes into the scan's ∂u by one addmm,
    where the graph allocated each and summed them in separate passes, with a node per operation (a merged Vim-S
    training step: docs/cpu_speed.md, round 15)."""

    @staticmethod
    def forward(ctx, x: Tensor, z: Tensor, *params: Tensor | None) -> Tensor:
        directions = ((*params[:7], False), (*params[7:], True))
        u, (x_laid, taps, conv_b) = _conv(x, [(d[0], d[1], d[7]) for d in directions], True)  # 2×B×Dᵢ×L
        delta, dts, scans = _new(u[0], True, count=2), [], []
        for p, (_, _, x_proj_w, dt_proj_w, dt_bias, A, D, reverse) in enumerate(directions):
            x_dbl = F.linear(u[p].transpose(1, 2), x_proj_w)  # B×L×(R+2N)
            rank, nn = dt_proj_w.shape[1], A.shape[1]
            dt, Bm, Cm = torch.split(x_dbl, [rank, nn, nn], dim=-1)
            torch.matmul(dt, dt_proj_w.t(), out=delta[p].transpose(1, 2))
            dts.append(dt)
            scans.append((A, Bm.transpose(1, 2), Cm.transpose(1, 2), D, dt_bias, reverse))
        y, scan_saved = _scan(u, delta, scans, z, True)
        ctx.saved = [((x_laid, taps[p], conv_b[p]), u[p], dts[p], scan_saved[p]) for p in range(2)]
        ctx.save_for_backward(*params)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor) -> tuple[Tensor | None, ...]:
        params = ctx.saved_tensors
        g_x = None
        grads: list[Tensor | None] = []
        with kept():  # ∂u and ∂Δ end here: memory kept from call to call, not fresh pages (rmeeto.ops.workspace)
            scan_grads, g_z = _scan_grads([scan_saved for *_, scan_saved in ctx.saved], True, True, gy, pooled=True)
            for (conv_saved, u, dt, (*_, reverse)), scan_g, first in zip(ctx.saved, scan_grads, (0, 7), strict=True):
                conv_w, conv_b, x_proj_w, dt_proj_w = params[first : first + 4]
                g_u, g_delta, g_A, g_B, g_C, g_D, g_bias = scan_g
                nd, rank, nf = u.shape[1], dt.shape[-1], x_proj_w.shape[0]
                g_delta = g_delta.transpose(1, 2).reshape(-1, nd)  # (B·L)×Dᵢ, no copy (token-major)
                g_x_dbl = torch.cat([(g_delta @ dt_proj_w).view(dt.shape), g_B.transpose(1, 2), g_C.transpose(1, 2)],
                                    -1)  # fmt: skip
                g_dt_w = g_delta.t() @ dt.reshape(-1, rank)
                g_x_dbl = g_x_dbl.view(-1, nf)
                g_u.transpose(1, 2).view(-1, nd).addmm_(g_x_dbl, x_proj_w)  # + x_proj's input gradient, in place
                g_x_proj_w = g_x_dbl.t() @ u.transpose(1, 2).reshape(-1, nd)
                g_x, g_conv_w, g_conv_b = _conv_grads(*conv_saved, True, reverse, g_u, g_x)
                grads += [g_conv_w.reshape(conv_w.shape), None if conv_b is None else g_conv_b, g_x_proj_w, g_dt_w,
                          g_bias, g_A, g_D]  # fmt: skip
        return g_x, g_z, *grads


@torch.compiler.disable
def mixer_cpu(hidden: Tensor, in_proj: tuple[PackedLinear, PackedLinear], params: InnerParams, out_proj: PackedLinear,
              workspace: Workspace, x_dbl: Tensor | None = None) -> Tensor:  # fmt: skip
    """A Vim mixer's forward without gradients, B×L×C fp32 contiguous hidden → B×L×C (a new tensor), with every
    product's weight packed (rmeeto.frozen; each PackedLinear ``packs``): in_proj's halves, what mamba_inner_cpu
    computes and out_proj (the halving in it), all in one kernel call (cpu_kernels.mixer_forward), with the same
    bits. Between separate calls each tensor operation and Python step cost 3–5× its cost in a tight loop, as the
    big products and scans before it push the interpreter's code and data out of the core's caches: a merged
    Vim-S 1.07× and an unreduced one 1.09× as fast so at batch 1, 1.05× at batch 8 (docs/cpu_speed.md, round
    14). Intermediates in ``workspace``; x_proj's outputs copied to ``x_dbl`` where given (as mamba_inner_cpu's)."""
    return _mixer(hidden, None, None, 0.0, in_proj, params, out_proj, workspace, x_dbl)[0]


@torch.compiler.disable
def block_cpu(hidden: Tensor, residual: Tensor | None, weight: Tensor, eps: float,
              in_proj: tuple[PackedLinear, PackedLinear], params: InnerParams, out_proj: PackedLinear,
              workspace: Workspace, x_dbl: Tensor | None = None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """A Vim block without gradients in one kernel call: (mixer_cpu(normed), summed) for ``normed, summed =
    add_rms_norm_cpu(hidden, residual, weight, eps)``, with the same bits (B×L×C fp32 contiguous; two new tensors):
    one dispatch and its Python fewer per block (docs/cpu_speed.md, round 14). ``x_dbl`` as mixer_cpu's."""
    return _mixer(hidden, residual, weight, eps, in_proj, params, out_proj, workspace, x_dbl)


def _mixer(hidden: Tensor, residual: Tensor | None, weight: Tensor | None, eps: float,
           in_proj: tuple[PackedLinear, PackedLinear], params: InnerParams, out_proj: PackedLinear,
           workspace: Workspace, x_dbl: Tensor | None) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """mixer_cpu's (no ``weight``: summed is None) and block_cpu's work."""
    if not AVAILABLE:
        raise RuntimeError("the cpu mixer kernels need numba")
    nb, L, nc = hidden.shape
    rows, (ndir, nd, nn), nf = nb * L, params.A.shape, params.x_proj[0].weight.shape[0]
    summed = hidden.new_empty(nb, L, nc) if weight is not None else None
    out = hidden.new_empty(nb, L, nc)
    work = workspace.empty(_k.mixer_work(rows, nc, nd, nf, ndir))
    data = hidden.numpy()
    norm = (data if residual is None else residual.numpy(), residual is not None,
            _NO_NORM if weight is None else weight.detach().numpy(), np.float32(eps), _NORM_CHUNK,
            data if summed is None else summed.numpy())  # fmt: skip
    with kernel_lock as threads:
        groups = scan_groups(threads, nb, nd)
        packs = (*(p.packed(rows) for p in in_proj), tuple(p.packed(rows) for p in params.x_proj),
                 out_proj.packed(rows))  # fmt: skip
        _k.mixer_forward(packed.COMPUTE_ADDRESS, weight is not None, data, *norm, *packs, params.taps, params.conv_b,
                         params.revs, params.A, params.D, params.dt_bias, params.dt_w, work.numpy(), _counter(),
                         *_scratch(_k.forward_scratch(L, nn), groups), out.numpy())  # fmt: skip
    if x_dbl is not None:
        start, size = _k.mixer_x_dbl(rows, nc, nd, nf, ndir)
        x_dbl.view(-1).copy_(work[start : start + size])
    return out, summed
