"""The one scan signature (``ScanFn``), the shared pre/post-processing around a core scan, and
``wants_grad``."""

from collections.abc import Iterable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class ScanFn(Protocol):
    """A backend's selective scan; the dispatch always passes all nine arguments, positionally.

    u, delta, z: B×D×L; A: D×N; B, C: B×N×L; D, delta_bias: (D,) or None → y B×D×L in u's dtype
    (mamba-ssm's ``selective_scan_fn`` contract; ``scan_ref.selective_scan_ref`` is the oracle).
    """

    def __call__(
        self,
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None,
        z: Tensor | None,
        delta_bias: Tensor | None,
        delta_softplus: bool,
        /,
    ) -> Tensor: ...


class CoreScan(Protocol):
    """core(dt, u, A, B, C) -> y: dt, u B×D×L; A D×N; B, C B×N×L; y B×D×L (all in the compute dtype)."""

    def __call__(self, dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor, /) -> Tensor: ...


def wants_grad(tensors: Iterable[Tensor | None]) -> bool:
    """Whether autograd would record an op on these tensors (None entries ignored); ``tensors`` is not iterated
    when gradients are off. A plain loop, not any() over a generator expression: once dynamo has met such a
    generator's frame on its own (after a graph break), compiling a block with fullgraph=True fails on it."""
    if not torch.is_grad_enabled():
        return False
    for x in tensors:
        if x is not None and x.requires_grad:
            return True
    return False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32: half types are upcast, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


class WithCore:
    """A ScanFn whose recurrence is ``core``; autograd covers bias/softplus before and D/z after.

    Computes in compute_dtype(u.dtype) and returns u's dtype.
    """

    def __init__(self, core: CoreScan):
        self.core = core

    def __call__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus, /) -> Tensor:  # ScanFn
        ct = compute_dtype(u.dtype)
        u_c, dt = u.to(ct), delta.to(ct)
        if delta_bias is not None:
            dt = dt + delta_bias.to(ct)[:, None]
        if delta_softplus:
            dt = F.softplus(dt)
        y = self.core(dt, u_c, A.to(ct), B.to(ct), C.to(ct))
        if D is not None:
            y = y + u_c * D.to(ct)[:, None]
        if z is not None:
            y = y * F.silu(z.to(ct))
        return y.to(u.dtype)
