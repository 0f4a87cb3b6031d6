"""`cpu` backend: fused numba selective scan, forward and backward (available only if numba imports).

Threads: numba prefers its OpenMP layer here, then ``workqueue``, then tbb (unless
NUMBA_THREADING_LAYER is set), and its OpenMP runtime is loaded with OMP_WAIT_POLICY=PASSIVE (unless
the user set one), so its idle threads sleep instead of spinning against PyTorch's between kernels:
with ``workqueue``, or with spinning OpenMP threads, the scans of a Vim-S forward ran ~1.4× slower
on a 2-core machine (and the matrix multiplies between them slower too). That runtime is not
fork-safe: a process forked after the scan ran here must not run it again (numba stops it with a
message); set NUMBA_THREADING_LAYER=workqueue for such uses. Kernel calls are serialised by a lock
(the layers are not re-entrant) and use torch.get_num_threads() threads.
"""

import math
import os
import threading

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

try:
    import numba

    from . import cpu_kernels as _k
except ImportError:  # numba missing or broken: the backend is simply unavailable
    numba = _k = None

AVAILABLE = _k is not None
_LOCK = threading.Lock()
_STARTED = False  # numba's threads are running

if AVAILABLE and "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]


def _lanes(x: Tensor | None, nd: int, nblk: int) -> np.ndarray:
    """D×M (or (D,)) per-channel parameter → K×M×LANES, zero-padded (zeros when x is None).

    In numpy: these small reshapes cost a few µs there and several aten calls each in torch.
    """
    if x is None:
        return np.zeros((nblk, 1, _k.LANES), np.float32)
    x = x.detach().reshape(nd, -1).numpy()
    out = np.zeros((nblk * _k.LANES, x.shape[1]), np.float32)
    out[:nd] = x
    return np.ascontiguousarray(out.reshape(nblk, _k.LANES, -1).transpose(0, 2, 1))


def _threads() -> int:
    """Set numba's thread count to torch's (capped) and return it; the first call starts the threads."""
    global _STARTED
    n = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if _STARTED or "OMP_WAIT_POLICY" in os.environ:
        numba.set_num_threads(n)
    else:  # the runtime reads the policy once, when it loads; the process keeps its own environment
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            numba.set_num_threads(n)
        finally:
            del os.environ["OMP_WAIT_POLICY"]
    _STARTED = True
    return n


class _CpuScan(torch.autograd.Function):
    """Fused scan on fp32 CPU tensors; D, z, delta_bias may be None (see selective_scan_cpu)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool) -> Tensor:
        nb, nd, L = u.shape
        nblk = math.ceil(nd / _k.LANES)
        has_z = z is not None
        (u, delta, z), layout = _rows((u, delta, z if has_z else u))
        A_b = _lanes(A, nd, nblk)  # K×N×LANES
        D_b, bias_b = _lanes(D, nd, nblk)[:, 0], _lanes(delta_bias, nd, nblk)[:, 0]  # K×LANES
        B_l, C_l = (np.array(x.detach().numpy().transpose(0, 2, 1), order="C") for x in (B, C))  # B×L×N copies
        out = u.new_empty(nb, nd, L)
        with _LOCK:
            groups = min(_threads(), nb * nblk)
            scratch = [np.empty((groups, *s), np.float32) for s in _k.forward_scratch(L, A.shape[1])]
            _k.scan_forward(*_np((u, delta, z)), layout, A_b, B_l, C_l, D_b, bias_b, softplus, has_z,
                            out.numpy(), _counter(), *scratch)  # fmt: skip
        ctx.save_for_backward(u, delta, z)
        ctx.params, ctx.softplus, ctx.has_z, ctx.layout = (A_b, B_l, C_l, D_b, bias_b), softplus, has_z, layout
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout: Tensor) -> tuple[Tensor | None, ...]:
        u, delta, z = ctx.saved_tensors
        A_b, B_l, C_l, D_b, bias_b = ctx.params
        nb, L, nd = gout.shape[0], gout.shape[2], gout.shape[1]
        nblk, nn, lanes = A_b.shape
        (gout,), gout_layout = _rows((gout.float(),))
        g_u, g_delta = gout.new_empty(nb, nd, L), gout.new_empty(nb, nd, L)
        g_z = gout.new_empty(nb, nd, L) if ctx.has_z else g_u
        g_A = gout.new_empty(nb, nblk, nn, lanes)
        g_D, g_bias = gout.new_empty(nb, nblk, lanes), gout.new_empty(nb, nblk, lanes)
        with _LOCK:
            threads = _threads()
            parts = min(nblk, math.ceil(8 * threads / nb))  # ≥ 8 tasks per thread where there are blocks
            groups = min(threads, nb * parts)
            g_B, g_C = gout.new_empty(parts, nb, nn, L), gout.new_empty(parts, nb, nn, L)
            scratch = [np.empty((groups, *s), np.float32) for s in _k.backward_scratch(L)]
            grads = (g_u, g_delta, g_z, g_A, g_B, g_C, g_D, g_bias)
            layout = ctx.layout | gout_layout << 3
            _k.scan_backward(*_np((u, delta, z, gout)), layout, A_b, B_l, C_l, D_b, bias_b, ctx.softplus,
                             ctx.has_z, *_np(grads), _counter(), *scratch)  # fmt: skip
        g_A = g_A.sum(0).transpose(0, 1).reshape(nn, nblk * lanes)[:, :nd].t()
        g_B, g_C = g_B.sum(0), g_C.sum(0)
        g_D, g_bias = (g.sum(0).reshape(-1)[:nd] for g in (g_D, g_bias))
        needs = ctx.needs_input_grad
        optional = (g_D if needs[5] else None, g_z if needs[6] else None, g_bias if needs[7] else None)
        return g_u, g_delta, g_A, g_B, g_C, *optional, None


def _rows(xs: tuple[Tensor, ...]) -> tuple[tuple[Tensor, ...], int]:
    """Detached B×D×L tensors → contiguous B×D×L, or B×L×D where the channels are already contiguous
    (transposed views such as Vim's delta and z: no transposing copy); bit i of the int is set when
    xs[i] went B×L×D."""
    out, layout = [], 0
    for i, x in enumerate(xs):
        x = x.detach()
        if x.stride(1) == 1 and x.shape[2] > 1:
            out.append(x.transpose(1, 2).contiguous())
            layout |= 1 << i
        else:
            out.append(x.contiguous())
    return tuple(out), layout


def _counter():
    """The kernels' shared task counter."""
    return np.zeros(1, np.int64)


def _np(tensors) -> list:
    return [x.numpy() for x in tensors]


def selective_scan_cpu(*args) -> Tensor:  # ScanFn: u, delta, A, B, C, D, z, delta_bias, delta_softplus
    """Fused numba selective scan on CPU tensors (the ScanFn contract; fp32 inside)."""
    if not AVAILABLE:
        raise RuntimeError("the cpu selective-scan backend needs numba")
    *tensors, softplus = args
    y = _CpuScan.apply(*(None if x is None else x.float() for x in tensors), bool(softplus))
    return y.to(args[0].dtype)
