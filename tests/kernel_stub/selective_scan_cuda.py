"""CPU stand-in for mamba-ssm's compiled ``selective_scan_cuda`` extension (tests only).

Checks what csrc/selective_scan/selective_scan.cpp checks (dtypes, shapes, unit last stride, fp32
D and delta_bias, dstate ≤ 256), except that tensors live on the CPU, and computes with mamba-ssm's
own ``selective_scan_ref`` (forward) and autograd through it (backward). The ``x`` intermediates
hold only the last state (what mamba-ssm's Python reads); the backward recomputes from the inputs.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CHUNK = 2048  # the kernel's chunk length: x holds one state per chunk


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"selective_scan_cuda: {msg}")


def _unit_stride(x: Tensor, name: str) -> None:
    _check(x.stride(-1) == 1 or x.size(-1) == 1, f"{name} must have contiguous last dimension")


def _check_inputs(u, delta, A, B, C, D, z, delta_bias) -> None:
    """The forward's TORCH_CHECKs (device checks aside)."""
    itype = u.dtype
    _check(itype in INPUT_DTYPES, f"u dtype {itype} not supported")
    _check(A.dtype == torch.float32, f"A must be float32 (real weights), got {A.dtype}")
    _check(delta.dtype == itype, f"delta dtype {delta.dtype} != u dtype {itype}")
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    _check(dstate <= 256, "only support state dimension <= 256")
    _check(tuple(delta.shape) == (batch, dim, seqlen), f"delta shape {tuple(delta.shape)}")
    _check(tuple(A.shape) == (dim, dstate), f"A shape {tuple(A.shape)}")
    for name, x in (("u", u), ("delta", delta)):
        _unit_stride(x, name)
    for name, x in (("B", B), ("C", C)):
        _check(x.dtype == itype, f"{name} dtype {x.dtype} != u dtype {itype} (variable {name})")
        _check(x.dim() == 4, f"variable {name} must be batch×groups×dstate×seqlen, got {tuple(x.shape)}")
        _check(x.shape[0] == batch and x.shape[2:] == (dstate, seqlen), f"{name} shape {tuple(x.shape)}")
        _check(dim % x.shape[1] == 0, f"{name}: dim {dim} not divisible by {x.shape[1]} groups")
        _unit_stride(x, name)
    for name, x in (("D", D), ("delta_bias", delta_bias)):
        if x is not None:
            _check(x.dtype == torch.float32, f"{name} must be float32, got {x.dtype}")
            _check(tuple(x.shape) == (dim,), f"{name} shape {tuple(x.shape)} != ({dim},)")
    if z is not None:
        _check(z.dtype == itype, f"z dtype {z.dtype} != u dtype {itype}")
        _check(tuple(z.shape) == (batch, dim, seqlen), f"z shape {tuple(z.shape)}")
        _unit_stride(z, "z")


def _scan(u, delta, A, B, C, D, delta_bias, softplus: bool) -> tuple[Tensor, Tensor]:
    """fp32 y (B×D×L, no gate) and last state (B×D×N) from mamba-ssm's reference."""
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    return selective_scan_ref(
        u.float(), delta.float(), A, B, C, D, None, delta_bias, softplus, return_last_state=True
    )


def fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """→ [out, x] or [out, x, out_z]: out (gate-free) and out_z in u's dtype; x B×D×chunks×2N fp32."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    y, last = _scan(u, delta, A, B, C, D, delta_bias, delta_softplus)
    batch, dim, seqlen = u.shape
    x = torch.zeros(batch, dim, math.ceil(seqlen / CHUNK), 2 * A.shape[1])
    x[:, :, -1, 1::2] = last
    out = y.to(u.dtype)
    if z is None:
        return [out, x]
    return [out, x, (y * F.silu(z.float())).to(u.dtype)]


def bwd(u, delta, A, B, C, D, z, delta_bias, dout, x, out, dz, delta_softplus, recompute_out_z):
    """→ [du, ddelta, dA, dB, dC, dD, ddelta_bias] (+ [dz, out_z] with z); dz is written in place
    when given. du, ddelta, dz in u's dtype; the rest fp32 (as the kernel returns them)."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias)
    _check(dout.dtype == u.dtype and dout.shape == u.shape, f"dout {dout.dtype} {tuple(dout.shape)}")
    _unit_stride(dout, "dout")
    if z is not None:
        _check(out is not None and out.shape == u.shape, "out is required with z")
        if dz is not None:
            _check(dz.dtype == u.dtype and dz.shape == u.shape, f"dz {dz.dtype} {tuple(dz.shape)}")
            _unit_stride(dz, "dz")
    leaves = [None if t is None else t.detach().float().requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias)]
    fu, fdelta, fA, fB, fC, fD, fz, fbias = leaves
    with torch.enable_grad():
        y, _ = _scan(fu, fdelta, fA, fB, fC, fD, fbias, delta_softplus)
        y_z = y if fz is None else y * F.silu(fz)
        inputs = [t for t in leaves if t is not None]
        grads = dict(zip(map(id, inputs), torch.autograd.grad(y_z, inputs, dout.float()), strict=True))
    grad = [None if t is None else grads[id(t)] for t in leaves]
    du, ddelta, dA, dB, dC, dD, dz_new, dbias = grad
    result = [du.to(u.dtype), ddelta.to(u.dtype), dA, dB, dC, dD, dbias]
    if z is None:
        return result
    dz = dz.copy_(dz_new) if dz is not None else dz_new.to(u.dtype)
    out_z = (y * F.silu(z.float())).to(u.dtype).detach() if recompute_out_z else None
    return [*result, dz, out_z]
