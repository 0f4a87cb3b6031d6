"""Backend selection and the public selective_scan / causal_conv1d entry points.

Precedence: per-call ``backend=`` > set_backend / use_backend > env RMEETO_SCAN_BACKEND > "auto".
"auto" picks `cuda` for CUDA tensors when available, else `cpu` (numba) for CPU tensors when
available, else `torch`.
"""

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from . import cuda, scan_cpu
from .common import ScanFn
from .conv import causal_conv1d_torch, check_activation
from .packed import PackedLinear
from .scan_ref import selective_scan_ref
from .scan_torch import selective_scan_torch

ENV_VAR = "RMEETO_SCAN_BACKEND"
AUTO = "auto"

_SCANS: dict[str, ScanFn] = {
    "ref": selective_scan_ref,
    "torch": selective_scan_torch,
    "cpu": scan_cpu.selective_scan_cpu,
    "cuda": cuda.selective_scan_cuda,
}
_REVERSIBLE = {"cpu"}
"""Backends whose scan runs in reverse natively; the others scan flipped inputs and flip the output."""
_DEVICE = {"cpu": "cpu", "cuda": "cuda"}
"""Backends bound to one device type."""

_selected: str | None = None
_warned_fallback = False


def unavailable_backends() -> dict[str, str]:
    """Backends not usable in this environment, each with the reason (e.g. mamba-ssm's import error)."""
    reasons = {}
    if not scan_cpu.AVAILABLE:
        reasons["cpu"] = "numba does not import (pip install numba)"
    if not cuda.available():
        reasons["cuda"] = cuda.unavailable_reason() or "unavailable"
    return reasons


def available_backends() -> list[str]:
    """Backends usable in this environment (``auto`` aside)."""
    unavailable = unavailable_backends()
    return [name for name in _SCANS if name not in unavailable]


def _validate(name: str) -> str:
    if name == AUTO or name in available_backends():
        return name
    kind = "unavailable" if name in _SCANS else "unknown"
    choices = ", ".join([AUTO, *available_backends()])
    why = unavailable_backends().get(name)
    raise ValueError(f"{kind} scan backend {name!r}; available: {choices}" + (f" ({name}: {why})" if why else ""))


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
        if device == "cuda":
            _warn_fallback()
        return "cpu" if device == "cpu" and scan_cpu.AVAILABLE else "torch"
    if _DEVICE.get(name, device) != device:
        raise ValueError(f"scan backend {name!r} needs {_DEVICE[name]} tensors, got {device}")
    return name


def _warn_fallback() -> None:
    """Once per process: CUDA tensors run on the `torch` scan because mamba-ssm is unusable."""
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"CUDA tensors, but the `cuda` scan backend is unavailable ({cuda.unavailable_reason()}); "
            "using the pure-PyTorch `torch` backend, far slower in training. See docs/cuda.md.",
            RuntimeWarning,
            stacklevel=3,
        )


def backend_summary(device: torch.device | str) -> str:
    """One line naming the scan backend used for tensors on ``device`` (and why not `cuda` there)."""
    device = torch.device(device)
    name = resolve_backend(torch.empty(0, device=device))
    line = f"scan backend: {name} (device {device.type}; available: {', '.join(available_backends())})"
    if device.type == "cuda" and name != "cuda":
        line += f"; cuda unavailable: {unavailable_backends().get('cuda')}"
    return line


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
    reverse: bool = False,
) -> Tensor:
    """Selective scan y = SSM(u) with input-dependent delta, B, C (mamba-ssm semantics).

    u, delta, z: B×D×L; A: D×N; B, C: B×N×L; D, delta_bias: (D,). Returns B×D×L in u's dtype,
    computed in at least fp32. reverse: scan from position L − 1 down to 0 (the scan of the flipped
    sequence, flipped back: a Vim's backward direction).
    """
    _check_shapes(u, delta, A, B, C)
    name = resolve_backend(u, backend)
    if name in _REVERSIBLE:
        return _SCANS[name](u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=reverse)
    if reverse:
        u, delta, B, C, z = (None if x is None else x.flip(-1) for x in (u, delta, B, C, z))
    y = _SCANS[name](u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return y.flip(-1) if reverse else y


def fused_inner(x: Tensor, conv_width: int, backend: str | None = None) -> bool:
    """True when tensors like x run on `cuda` and mamba-ssm's mamba_inner_fn can take this block
    (causal-conv1d imports and supports the conv width)."""
    return (
        resolve_backend(x, backend) == "cuda" and cuda.fused_inner_available() and conv_width in cuda.CONV_WIDTHS
    )


def fused_inner_cpu(x: Tensor, backend: str | None = None) -> bool:
    """True when a mixer's directions on x (B×Dᵢ×L, token-major) can run as scan_cpu.mamba_inner_cpu (no gradients)
    or mamba_inner_cpu_grad: the `cpu` backend and fp32 (the caller has checked that no record is wanted)."""
    return x.dtype == torch.float32 and resolve_backend(x, backend) == "cpu" and scan_cpu.token_major(x)


def cpu_block_inputs(hidden: Tensor, residual: Tensor | None = None) -> bool:
    """True when hidden (B×L×C) is on the CPU, fp32 and contiguous, and residual is None or fp32 and contiguous: the
    tensors one kernel call of a Vim mixer or block (scan_cpu.mixer_cpu, block_cpu) reads."""
    return (
        hidden.is_cpu
        and hidden.dtype == torch.float32
        and hidden.is_contiguous()
        and (residual is None or (residual.dtype == torch.float32 and residual.is_contiguous()))
    )


def _packed_cpu(like: Tensor, linears: tuple[PackedLinear | None, ...], backend: str | None) -> bool:
    """Autocast off, each of ``linears`` packs its weight (PackedLinear.packs) and the `cpu` backend for tensors
    like ``like``."""
    return (
        not torch.is_autocast_enabled("cpu")
        and all(linear is not None and linear.packs for linear in linears)
        and resolve_backend(like, backend) == "cpu"
    )


def fused_mixer_cpu(hidden: Tensor, *linears: PackedLinear | None, backend: str | None = None) -> bool:
    """True when a whole Vim mixer on hidden (B×L×C) can run as scan_cpu.mixer_cpu: the `cpu` backend, hidden fp32
    and contiguous, autocast off, and each of its products' ``linears`` packs its weight (PackedLinear.packs)."""
    return cpu_block_inputs(hidden) and _packed_cpu(hidden, linears, backend)


def fused_block_cpu(weight: Tensor, *linears: PackedLinear | None) -> bool:
    """True when Vim blocks, add + RMSNorm (``weight``) then a mixer with these products' ``linears``, can run as
    scan_cpu.block_cpu calls for inputs that pass cpu_block_inputs: the norm weight fp32, autocast off, each product
    on a packed copy, the `cpu` backend (for tensors on the weight's device). These hold for a whole forward, so a
    frozen Vim checks them once per forward, and each block's tensors with cpu_block_inputs (docs/cpu_speed.md,
    round 18)."""
    return weight.dtype == torch.float32 and _packed_cpu(weight, linears, None)


def fused_add_norm(hidden: Tensor, residual: Tensor | None, weight: Tensor, backend: str | None = None) -> bool:
    """True when residual add + RMSNorm can run as one cpu kernel (scan_cpu.add_rms_norm_cpu, with or without
    gradients): the `cpu` backend and all fp32."""
    tensors = [t for t in (hidden, residual, weight) if t is not None]
    return resolve_backend(hidden, backend) == "cpu" and all(t.dtype == torch.float32 for t in tensors)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = "silu",
    backend: str | None = None,
    reverse: bool = False,
) -> Tensor:
    """Depthwise causal conv1d: x B×D×L, weight D×K (or D×1×K), bias (D,) → B×D×L.

    activation: "silu"/"swish" or None. reverse: the conv of the flipped sequence, flipped back. The
    `cuda` backend uses causal-conv1d's kernel; `cpu` a numba kernel when x is token-major (a B×D×L view
    of B×L×D memory; the result is too); all others torch's F.conv1d.
    """
    check_activation(activation)
    name = resolve_backend(x, backend)
    if name == "cpu" and scan_cpu.token_major(x):
        return scan_cpu.causal_conv1d_cpu(x, weight, bias, activation, reverse)
    conv = cuda.causal_conv1d_cuda if name == "cuda" else causal_conv1d_torch
    if reverse:
        return conv(x.flip(-1), weight, bias, activation).flip(-1)
    return conv(x, weight, bias, activation)
