"""Backend selection and the public selective_scan / causal_conv1d entry points.

Precedence: per-call ``backend=`` > set_backend / use_backend > env RMEETO_SCAN_BACKEND > "auto".
"auto" picks `cuda` for CUDA tensors when available, else `cpu` (numba) for CPU tensors when
available, else `torch`.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor

from . import cuda, scan_cpu
from .conv import causal_conv1d_torch, check_activation
from .scan_ref import selective_scan_ref
from .scan_torch import selective_scan_torch

ENV_VAR = "RMEETO_SCAN_BACKEND"
AUTO = "auto"

_SCANS = {
    "ref": selective_scan_ref,
    "torch": selective_scan_torch,
    "cpu": scan_cpu.selective_scan_cpu,
    "cuda": cuda.selective_scan_cuda,
}
_DEVICE = {"cpu": "cpu", "cuda": "cuda"}
"""Backends bound to one device type."""

_selected: str | None = None


def available_backends() -> list[str]:
    """Backends usable in this environment (``auto`` aside)."""
    names = ["ref", "torch"]
    if scan_cpu.AVAILABLE:
        names.append("cpu")
    if cuda.available():
        names.append("cuda")
    return names


def _validate(name: str) -> str:
    if name == AUTO or name in available_backends():
        return name
    kind = "unavailable" if name in _SCANS else "unknown"
    choices = ", ".join([AUTO, *available_backends()])
    raise ValueError(f"{kind} scan backend {name!r}; available: {choices}")


def set_backend(name: str | None) -> None:
    """Select the default backend for this process; None clears it (env var / auto apply again)."""
    global _selected
    _selected = None if name is None else _validate(name)


def get_backend() -> str:
    """The default backend name in effect (may be ``auto``)."""
    return _selected or os.environ.get(ENV_VAR) or AUTO


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Temporarily select a backend: ``with use_backend("torch"): ...``."""
    global _selected
    previous = _selected
    set_backend(name)
    try:
        yield
    finally:
        _selected = previous


def resolve_backend(x: Tensor, backend: str | None = None) -> str:
    """Concrete backend for tensors like x (resolves ``auto``; checks device compatibility)."""
    name = _validate(backend or get_backend())
    device = x.device.type
    if name == AUTO:
        if device == "cuda" and cuda.available():
            return "cuda"
        return "cpu" if device == "cpu" and scan_cpu.AVAILABLE else "torch"
    if _DEVICE.get(name, device) != device:
        raise ValueError(f"scan backend {name!r} needs {_DEVICE[name]} tensors, got {device}")
    return name


def _check_shapes(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor) -> None:
    if u.dim() != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be B×D×L, got {tuple(u.shape)} and {tuple(delta.shape)}")
    nb, nd, L = u.shape
    if A.dim() != 2 or A.shape[0] != nd:
        raise ValueError(f"A must be D×N with D={nd}, got {tuple(A.shape)}")
    for name, x in (("B", B), ("C", C)):
        if tuple(x.shape) != (nb, A.shape[1], L):
            raise ValueError(f"{name} must be B×N×L = {(nb, A.shape[1], L)}, got {tuple(x.shape)}")


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    backend: str | None = None,
) -> Tensor:
    """Selective scan y = SSM(u) with input-dependent delta, B, C (mamba-ssm semantics).

    u, delta, z: B×D×L; A: D×N; B, C: B×N×L; D, delta_bias: (D,). Returns B×D×L in u's dtype,
    computed in at least fp32.
    """
    _check_shapes(u, delta, A, B, C)
    scan = _SCANS[resolve_backend(u, backend)]
    return scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    backend: str | None = None,
) -> Tensor:
    """Depthwise causal conv1d: x B×D×L, weight D×K (or D×1×K), bias (D,) → B×D×L.

    activation: "silu"/"swish" or None. The `cuda` backend uses causal-conv1d's kernel, all
    others torch's F.conv1d.
    """
    check_activation(activation)
    if resolve_backend(x, backend) == "cuda":
        return cuda.causal_conv1d_cuda(x, weight, bias, activation)
    return causal_conv1d_torch(x, weight, bias, activation)
