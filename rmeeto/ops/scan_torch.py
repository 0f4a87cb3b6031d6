"""`torch` backend: chunked pure-PyTorch selective scan with a hand-written, recomputing backward.

The sequence is cut into chunks of T steps. Per chunk, decays a = exp(dt⊗A) and inputs dt·u·B are
built with a few large ops (T×B×D×N), the recurrence h_t = a_t·h_{t-1} + b_t runs as one in-place
``addcmul_`` per step (products of decays ≤ 1 only: stable for any L and any negative A), and the
read-out and all gradients are batched matmuls / reductions over the chunk. Only the chunk-start
states (L/T × B×D×N) are kept for backward; chunk states are recomputed there.
"""

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .common import ScanFn, WithCore

_CHUNK_ELEMS = {"cpu": 1 << 20, "cuda": 1 << 25}
"""Target T·B·D·N per chunk buffer: cache-sized on CPU, few launches on GPU."""


def _chunk_len(x: Tensor, L: int, state: int) -> int:
    budget = _CHUNK_ELEMS.get(x.device.type, _CHUNK_ELEMS["cuda"])
    return max(1, min(L, budget // max(1, state)))


def _chunk_states(
    dt: Tensor, u: Tensor, A: Tensor, B: Tensor, h0: Tensor, buffers: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """dt, u: T×B×D; B: T×B×N; h0: B×D×N → decays a and states H, both T×B×D×N, written into
    the leading T rows of buffers (reused across chunks)."""
    a, H = (x[: dt.shape[0]] for x in buffers)
    torch.mul(dt[..., None], A, out=a).exp_()
    torch.mul((dt * u)[..., None], B[:, :, None, :], out=H)
    H[0].addcmul_(a[0], h0)
    for t in range(1, H.shape[0]):
        H[t].addcmul_(a[t], H[t - 1])
    return a, H


def _buffers(x: Tensor, T: int, N: int) -> tuple[Tensor, Tensor]:
    """Two T×B×D×N buffers for x: L×B×D."""
    return x.new_empty(T, *x.shape[1:], N), x.new_empty(T, *x.shape[1:], N)


class _ChunkedScan(torch.autograd.Function):
    """y = scan(dt, u, A, B, C): dt, u B×D×L; A D×N; B, C B×N×L → y B×D×L."""

    @staticmethod
    def forward(ctx, dt: Tensor, u: Tensor, A: Tensor, B: Tensor, C: Tensor) -> Tensor:
        nb, nd, L = u.shape
        T = _chunk_len(u, L, nb * nd * A.shape[1])
        dt_l, u_l = dt.permute(2, 0, 1).contiguous(), u.permute(2, 0, 1).contiguous()
        B_l, C_l = B.permute(2, 0, 1).contiguous(), C.permute(2, 0, 1).contiguous()
        y = u_l.new_empty(L, nb, nd)
        h = u_l.new_zeros(nb, nd, A.shape[1])
        starts = []
        buffers = _buffers(u_l, T, A.shape[1])
        for s in range(0, L, T):
            c = slice(s, s + T)
            starts.append(h)
            _, H = _chunk_states(dt_l[c], u_l[c], A, B_l[c], h, buffers)
            y[c] = torch.matmul(H, C_l[c, :, :, None]).squeeze(-1)
            h = H[-1].clone()
        ctx.save_for_backward(dt_l, u_l, A, B_l, C_l, torch.stack(starts))
        ctx.chunk = T
        return y.permute(1, 2, 0)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: Tensor) -> tuple[Tensor, ...]:
        dt_l, u_l, A, B_l, C_l, starts = ctx.saved_tensors
        T = ctx.chunk
        gy_l = gy.permute(2, 0, 1).to(dt_l.dtype).contiguous()
        g_dt, g_u = torch.empty_like(dt_l), torch.empty_like(u_l)
        g_B, g_C = torch.empty_like(B_l), torch.empty_like(C_l)
        g_A = torch.zeros_like(A)
        carry = torch.zeros_like(starts[0])
        buffers = _buffers(u_l, T, A.shape[1])
        for i in reversed(range(starts.shape[0])):
            c = slice(i * T, (i + 1) * T)
            dt, u, gyc = dt_l[c], u_l[c], gy_l[c]
            a, H = _chunk_states(dt, u, A, B_l[c], starts[i], buffers)
            G = gyc[..., None] * C_l[c, :, None, :]  # ∂y/∂h_t, then the full ∂L/∂h_t
            G[-1].add_(carry)
            for t in range(G.shape[0] - 2, -1, -1):
                G[t].addcmul_(a[t + 1], G[t + 1])
            carry = a[0] * G[0]
            g_C[c] = torch.matmul(gyc[:, :, None, :], H).squeeze(-2)
            g_B[c] = torch.matmul((dt * u)[:, :, None, :], G).squeeze(-2)
            g_bu = torch.matmul(G, B_l[c, :, :, None]).squeeze(-1)
            G.mul_(a)  # ∂L/∂(dt·A) = ∂L/∂h_t · h_{t-1} · a_t
            G[1:].mul_(H[:-1])
            G[0].mul_(starts[i])
            g_dt[c] = (G * A).sum(-1) + g_bu * u
            g_u[c] = g_bu * dt
            g_A += G.mul_(dt[..., None]).sum((0, 1))
        return g_dt.permute(1, 2, 0), g_u.permute(1, 2, 0), g_A, g_B.permute(1, 2, 0), g_C.permute(1, 2, 0)


selective_scan_torch: ScanFn = WithCore(_ChunkedScan.apply)
"""Chunked pure-PyTorch selective scan (the ScanFn contract)."""
