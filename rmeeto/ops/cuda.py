"""`cuda` backend: mamba-ssm's selective_scan_fn and causal-conv1d's causal_conv1d_fn (optional, lazy)."""

from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from .conv import causal_conv1d_torch, check_activation, conv_weight

CONV_WIDTHS = (2, 3, 4)
"""Kernel widths causal_conv1d_fn supports; other widths fall back to F.conv1d."""


@cache
def _scan_fn() -> Callable[..., Tensor] | None:
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


@cache
def _conv_fn() -> Callable[..., Tensor] | None:
    try:
        from causal_conv1d import causal_conv1d_fn
    except ImportError:
        return None
    return causal_conv1d_fn


def available() -> bool:
    """True when CUDA is usable and mamba-ssm's selective scan imports."""
    return torch.cuda.is_available() and _scan_fn() is not None


def selective_scan_cuda(
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
    """mamba-ssm's fused CUDA selective scan (same contract as selective_scan_ref)."""
    fn = _scan_fn()
    if fn is None:
        raise RuntimeError("the cuda selective-scan backend needs mamba-ssm")
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def causal_conv1d_cuda(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = "silu"
) -> Tensor:
    """causal-conv1d's CUDA kernel when it imports and supports the width, else F.conv1d."""
    check_activation(activation)
    weight = conv_weight(weight)
    fn = _conv_fn()
    if fn is None or weight.shape[1] not in CONV_WIDTHS:
        return causal_conv1d_torch(x, weight, bias, activation)
    return fn(x, weight, bias, activation=activation)
