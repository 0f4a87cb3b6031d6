"""`cuda` backend: mamba-ssm's selective_scan_fn / mamba_inner_fn and causal-conv1d's causal_conv1d_fn.

The libraries are imported lazily, once; when an import fails the error is kept (``import_error``)
so that the dispatch can say why the backend is unavailable and warn once when CUDA tensors meet it.
"""

from collections.abc import Callable
from functools import cache
from types import ModuleType

import torch
from torch import Tensor

from .conv import causal_conv1d_torch, check_activation, conv_weight

CONV_WIDTHS = (2, 3, 4)
"""Kernel widths causal_conv1d_fn supports; other widths fall back to F.conv1d."""


@cache
def _scan_module() -> ModuleType | BaseException:
    """mamba-ssm's selective_scan_interface, or the exception its import raised."""
    try:
        from mamba_ssm.ops import selective_scan_interface
    except Exception as err:  # ImportError, or e.g. an undefined symbol of a build for another torch
        return err
    return selective_scan_interface


@cache
def _conv_fn() -> Callable[..., Tensor] | None:
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # missing or broken: F.conv1d serves instead (numerically the same)
        return None
    return causal_conv1d_fn


def import_error() -> BaseException | None:
    """Why mamba-ssm's selective scan does not import (None when it does)."""
    mod = _scan_module()
    return mod if isinstance(mod, BaseException) else None


@torch.compiler.assume_constant_result
def unavailable_reason() -> str | None:
    """Why the backend is unusable here, or None when it is usable. A constant to torch.compile, which calls it
    instead of tracing it: traced, a failing import of mamba-ssm stopped a fullgraph compile (on a GPU machine
    without the kernels) and broke the graph otherwise."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    err = import_error()
    return None if err is None else f"mamba-ssm does not import: {type(err).__name__}: {err}"


def available() -> bool:
    """True when CUDA is usable and mamba-ssm's selective scan imports."""
    return unavailable_reason() is None


def _interface() -> ModuleType:
    mod = _scan_module()
    if isinstance(mod, BaseException):
        raise RuntimeError(f"the cuda selective-scan backend needs mamba-ssm ({mod})") from mod
    return mod


def selective_scan_cuda(*args) -> Tensor:  # ScanFn: u, delta, A, B, C, D, z, delta_bias, delta_softplus
    """mamba-ssm's fused CUDA selective scan (the ScanFn contract)."""
    return _interface().selective_scan_fn(*args)


def fused_inner_available() -> bool:
    """True when mamba-ssm's mamba_inner_fn can run (it needs causal-conv1d's kernel too)."""
    mod = _scan_module()
    return not isinstance(mod, BaseException) and mod.causal_conv1d_fwd_function is not None


def mamba_inner(xz: Tensor, **weights: Tensor | None) -> Tensor:
    """mamba-ssm's ``mamba_inner_fn`` (conv → x_proj → dt_proj → scan → gate → out_proj, with conv
    and Δ recomputed in the backward): xz B×2Dᵢ×L (L-contiguous) → B×L×C. ``weights`` are its
    keyword arguments (conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
    out_proj_weight, out_proj_bias, A, D, delta_bias)."""
    return _interface().mamba_inner_fn(xz, delta_softplus=True, **weights)


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
