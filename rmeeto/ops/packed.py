"""Linear maps with fixed weights on MKL's packed GEMM (cblas_sgemm_pack once, cblas_sgemm_compute per call).

An ordinary product re-packs the weight into MKL's internal blocked layout at every call. For inference with
fixed weights (rmeeto.frozen) the Vim mixers pack in_proj's halves and out_proj once and multiply by the
packed copy, into the caller's buffer (the inference workspace): at Vim-S's sizes 1.06–1.11× the GFLOP/s of
torch.matmul, with the same bits (docs/cpu_speed.md, round 12). torch has the same routines behind
``torch.ops.mkl._mkl_linear``, an internal op that always allocates its output (a fresh B×L×Dᵢ buffer
page-faults its memory in: 10 % of a merged Vim-S forward at batch 8), so they are called here directly, from
the MKL that torch's CPU library links and exports. Where that is not so (a torch built without MKL, or on
another platform) ``AVAILABLE`` is False and PackedLinear multiplies with torch.matmul.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

ROW_MAJOR, NO_TRANS, TRANS, B_MATRIX, PACKED = 101, 111, 112, 162, 151  # MKL's CBLAS enumerators


def _mkl() -> ctypes.CDLL | None:
    """torch's CPU library, with the packed-GEMM signatures declared (LP64: MKL_INT is a C int), or None."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get_size, pack, compute = lib.cblas_sgemm_pack_get_size, lib.cblas_sgemm_pack, lib.cblas_sgemm_compute
    except (OSError, AttributeError):
        return None
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    get_size.restype, get_size.argtypes = ctypes.c_size_t, [i] * 4
    pack.restype, pack.argtypes = None, [i] * 6 + [f, p, i, p]
    compute.restype, compute.argtypes = None, [i] * 6 + [p, i, p, i, f, p, i]
    return lib


_LIB = _mkl()
AVAILABLE = _LIB is not None


def _address(name: str) -> int:
    """The address of the function ``name`` in torch's CPU library, or 0 where it has none (or no MKL)."""
    fn = getattr(_LIB, name, None) if AVAILABLE else None
    return 0 if fn is None else ctypes.cast(fn, ctypes.c_void_p).value


COMPUTE_ADDRESS = _address("cblas_sgemm_compute")
"""The address of MKL's cblas_sgemm_compute, for numba kernels that multiply by packed copies themselves
(rmeeto.ops.cpu_kernels.mixer_forward): passed to them as an argument, so that they can be cached on disk."""
SGEMM_ADDRESS = _address("SGEMM")
"""The address of MKL's SGEMM (the Fortran interface, which torch's CPU products call), for numba kernels that
multiply unpacked matrices (rmeeto.ops.merge_kernel.match_merge); 0 where torch's library does not export
it."""


COPIES = 2
"""Packed copies a PackedLinear keeps, for the last row counts it multiplied (each about the weight's size).
MKL packs for the row count it will compute with, so a frozen Vim run merged and unreduced in turn, or at
two batch sizes (a last partial batch), packs every mixer's weights again at each switch if only one copy is
kept: a merged Vim-S at batch 1, run in turn with the unreduced one, took 72 ms a forward against 54 ms so
(docs/cpu_speed.md, round 13)."""


class PackedLinear:
    """``alpha · x @ weightᵀ`` for a fixed fp32 weight (N×K), packed per (rows of x, torch's thread count):
    MKL packs for the shape and threads it will compute with, and scales the packed copy by alpha (a power of
    two, as a Vim mixer's halving, scales exactly). The copies for the last :data:`COPIES` such keys are
    kept; another key packs again, replacing the least recently used. The weight may change after it was
    packed without effect (rmeeto.frozen makes new PackedLinears when a parameter changes). With
    ``pack=False`` nothing is packed and the product is torch.matmul's: for a weight used once, as packing
    is not free inside a model (packing at every call made a merged Vim-S 0.90× as fast at batch 1,
    docs/cpu_speed.md, round 12)."""

    def __init__(self, weight: Tensor, alpha: float = 1.0, pack: bool = True):
        self.weight, self.alpha, self.pack = weight.detach(), alpha, pack
        self._packs: dict[tuple[int, int], np.ndarray] = {}  # (rows, threads) → packed copy, least recently used first

    @property
    def packs(self) -> bool:
        """Whether fp32 products go through a packed copy (``pack`` and MKL available)."""
        return self.pack and AVAILABLE

    def packed(self, rows: int) -> np.ndarray:
        """The copy packed for a product with ``rows`` rows on torch's current thread count (packing it if need
        be): MKL's format, for cblas_sgemm_compute only; a numpy array, as the numba kernels take it (converting
        at every call cost a frozen Vim block some µs, docs/cpu_speed.md, round 15). Needs :attr:`packs`."""
        key = (rows, torch.get_num_threads())
        buf = self._packs.pop(key, None)
        if buf is None:
            if len(self._packs) == COPIES:
                del self._packs[next(iter(self._packs))]
            buf = torch.empty(self.packed_size(rows), dtype=torch.float32).numpy()  # torch's: 64-byte aligned
            self.pack_into(rows, buf)
        self._packs[key] = buf
        return buf

    def packed_size(self, rows: int) -> int:
        """The floats of a copy packed for ``rows`` rows. Needs :attr:`packs`."""
        n, k = self.weight.shape
        return -(-_LIB.cblas_sgemm_pack_get_size(B_MATRIX, rows, n, k) // 4)

    def pack_into(self, rows: int, buf: np.ndarray) -> None:
        """Pack for a product with ``rows`` rows on torch's current thread count into ``buf`` (contiguous fp32, at
        least :meth:`packed_size` floats, 64-byte aligned), which must never move afterwards: MKL's packed format
        stays valid only where it was written. Needs :attr:`packs`."""
        n, k = self.weight.shape
        w = self.weight.contiguous()
        _LIB.cblas_sgemm_pack(ROW_MAJOR, B_MATRIX, TRANS, rows, n, k, self.alpha, w.data_ptr(), k, buf.ctypes.data)

    @torch.compiler.disable
    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """x: …×K fp32 on the CPU → …×N, into ``out`` (contiguous) when given."""
        n, k = self.weight.shape
        out = x.new_empty(*x.shape[:-1], n) if out is None else out
        fp32 = x.dtype == self.weight.dtype == out.dtype == torch.float32
        if not (self.packs and fp32 and x.is_cpu and out.is_contiguous()):
            out = torch.matmul(x, self.weight.t(), out=out)
            return out if self.alpha == 1 else out.mul_(self.alpha)
        a = x.reshape(-1, k)
        if a.stride(1) != 1 or a.stride(0) < k:
            a = a.contiguous()
        rows = a.shape[0]
        if rows == 0:
            return out
        _LIB.cblas_sgemm_compute(ROW_MAJOR, NO_TRANS, PACKED, rows, n, k, a.data_ptr(), a.stride(0),
                                 self.packed(rows).ctypes.data, n, 0.0, out.data_ptr(), n)  # fmt: skip
        return out
