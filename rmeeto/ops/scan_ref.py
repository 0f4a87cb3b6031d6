"""`ref` backend: the step-by-step selective scan, written for clarity; the oracle for the others."""

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import compute_dtype


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
) -> Tensor:
    """Selective scan (mamba-ssm ``selective_scan_ref`` semantics, real A, input-dependent B and C).

    u, delta, z: B×D×L; A: D×N; B, C: B×N×L; D, delta_bias: (D,). Loops over L, vectorised over
    batch, channels and state; computes in at least fp32 and returns B×D×L in u's dtype.
    """
    ct = compute_dtype(u.dtype)
    u_c, dt, A, B, C = (x.to(ct) for x in (u, delta, A, B, C))
    if delta_bias is not None:
        dt = dt + delta_bias.to(ct)[:, None]
    if delta_softplus:
        dt = F.softplus(dt)
    h = u_c.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for dt_t, u_t, B_t, C_t in zip(dt.unbind(-1), u_c.unbind(-1), B.unbind(-1), C.unbind(-1), strict=True):
        h = torch.exp(dt_t[..., None] * A) * h + (dt_t * u_t)[..., None] * B_t[:, None]
        ys.append((h * C_t[:, None]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u_c * D.to(ct)[:, None]
    if z is not None:
        y = y * F.silu(z.to(ct))
    return y.to(u.dtype)
