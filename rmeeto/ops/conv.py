"""Depthwise causal conv1d (causal-conv1d's ``causal_conv1d_ref`` semantics) on torch's F.conv1d."""

import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = (None, "silu", "swish")


def check_activation(activation: str | None) -> None:
    """Raise ValueError unless activation is None, "silu" or "swish"."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: unsupported activation {activation!r}; expected one of {ACTIVATIONS}")


def conv_weight(weight: Tensor) -> Tensor:
    """Accept D×K or D×1×K; return D×K."""
    return weight.squeeze(1) if weight.dim() == 3 else weight


def causal_conv1d_torch(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = "silu"
) -> Tensor:
    """x: B×D×L, weight: D×K (or D×1×K), bias: (D,) → B×D×L; left-padded by K−1, optional SiLU.

    Computes in the weight's dtype and returns x's dtype.
    """
    check_activation(activation)
    weight = conv_weight(weight)
    dim, width = weight.shape
    out = F.conv1d(x.to(weight.dtype), weight[:, None], bias, padding=width - 1, groups=dim)[..., : x.shape[-1]]
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)
