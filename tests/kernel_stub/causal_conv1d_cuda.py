"""CPU stand-in for causal-conv1d's compiled ``causal_conv1d_cuda`` extension (tests only).

Checks what csrc/causal_conv1d.cpp checks (dtypes, widths 2-4, the channel-first/channel-last layout
rules and the channel-last alignment to 8, output layouts matching the input), except that tensors
live on the CPU, and computes with causal-conv1d's own ``causal_conv1d_ref`` (the backward in closed
form). Results go into the caller's ``out`` / ``dx`` / ``dweight`` / ``dbias`` tensors,
as the kernel writes them.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise RuntimeError(f"causal_conv1d_cuda: {msg}")


def _channel_last(x: Tensor) -> bool:
    return x.stride(1) == 1 and x.stride(2) > 1


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx, initial_states) -> bool:
    """The shared TORCH_CHECKs; returns whether x is channel-last (B×D×L view of B×L×D)."""
    _check(x.dtype in DTYPES and weight.dtype in DTYPES, f"dtypes {x.dtype}/{weight.dtype} not supported")
    batch, dim, _ = x.shape
    _check(weight.dim() == 2 and weight.shape[0] == dim, f"weight must be dim×width, got {tuple(weight.shape)}")
    width = weight.shape[1]
    _check(2 <= width <= 4, f"causal_conv1d only supports width between 2 and 4, got {width}")
    _check(x.stride(2) == 1 or x.stride(1) == 1, f"x must be channel-first or channel-last, strides {x.stride()}")
    last = _channel_last(x)
    if last:
        _check(dim % 8 == 0, f"causal_conv1d only supports channel dimension divisible by 8 for now, got {dim}")
        _check(x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, f"strides must be multiples of 8, got {x.stride()}")
    if bias is not None:
        _check(bias.dtype == weight.dtype and tuple(bias.shape) == (dim,), f"bias {bias.dtype} {tuple(bias.shape)}")
        _check(bias.stride(-1) == 1, "bias must be contiguous")
    _check(seq_idx is None or last, "seq_idx is only supported for channel last layout")
    _check(initial_states is None or last, "initial_states is only supported for channel last layout")
    return last


def _like(name: str, t: Tensor, x: Tensor, last: bool) -> None:
    """``t`` (out, dout, dx) must match x's dtype, shape and layout."""
    _check(t.dtype == x.dtype and t.shape == x.shape, f"{name} {t.dtype} {tuple(t.shape)} != x")
    ok = _channel_last(t) if last else t.stride(2) == 1
    _check(ok, f"{name} must be {'channel-last' if last else 'contiguous in L'} like x, strides {t.stride()}")


def causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states, out, final_states_out, silu_activation) -> None:
    """Writes act(conv(x)) into out (B×D×L, x's layout)."""
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref

    last = _check_inputs(x, weight, bias, seq_idx, initial_states)
    _check(seq_idx is None and initial_states is None and final_states_out is None, "stand-in: no states")
    _like("out", out, x, last)
    out.copy_(causal_conv1d_ref(x, weight, bias, activation="silu" if silu_activation else None))


def causal_conv1d_bwd(
    x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, dweight, dbias, dinitial_states, silu_activation
) -> None:
    """Writes dx and accumulates into the fp32 dweight / dbias, as the kernel does.

    Gradients in closed form, in fp32: a custom op's body runs below autograd, so autograd through
    causal_conv1d_ref is not available here.
    """
    last = _check_inputs(x, weight, bias, seq_idx, initial_states)
    _check(seq_idx is None and initial_states is None and dfinal_states is None, "stand-in: no states")
    if (last and dout.stride(1) != 1) or (not last and dout.stride(2) != 1):  # the kernel re-lays dout out
        dout = dout.transpose(1, 2).contiguous().transpose(1, 2) if last else dout.contiguous()
    _like("dout", dout, x, last)
    _like("dx", dx, x, last)
    _check(dweight.dtype == torch.float32 and dweight.shape == weight.shape, f"dweight {dweight.dtype}")
    xf, w, g = x.float(), weight.float(), dout.float()
    dim, width = w.shape
    xpad = F.pad(xf, (width - 1, 0))
    if silu_activation:  # g ← g · silu'(pre), pre = conv(x) + bias
        pre = F.conv1d(xpad, w[:, None], None if bias is None else bias.float(), groups=dim)
        sig = torch.sigmoid(pre)
        g = g * sig * (1 + pre * (1 - sig))
    dx.copy_(F.conv1d(F.pad(g, (0, width - 1)), w.flip(-1)[:, None], groups=dim))
    dweight.add_((g[..., None] * xpad.unfold(-1, width, 1)).sum((0, 2)))
    if bias is not None:
        _check(dbias is not None and dbias.dtype == torch.float32, "dbias must be a float32 tensor")
        dbias.add_(g.sum((0, 2)))


def causal_conv1d_update(*args) -> None:
    """Decoding step: not used by rmeeto."""
    raise NotImplementedError("causal_conv1d_cuda stand-in: causal_conv1d_update is not emulated")
