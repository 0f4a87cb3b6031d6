"""Shared pre/post-processing around a core scan: delta bias/softplus before, D skip and z gate after."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

CoreScan = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""core(dt, u, A, B, C) -> y: dt, u B×D×L; A D×N; B, C B×N×L; y B×D×L (all in the compute dtype)."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least fp32: half types are upcast, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def scan_with_core(
    core: CoreScan,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Selective scan with the recurrence done by ``core``; autograd covers the elementwise parts.

    Computes in ``dtype`` (default: compute_dtype(u.dtype)) and returns B×D×L in u's dtype.
    """
    ct = dtype or compute_dtype(u.dtype)
    u_c, dt = u.to(ct), delta.to(ct)
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    y = core(dt, u_c, A.to(ct), B.to(ct), C.to(ct))
    if D is not None:
        y = y + u_c * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype)
