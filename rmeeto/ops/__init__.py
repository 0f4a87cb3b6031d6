"""Selective-scan and causal-conv1d kernels behind one dispatch API.

Backends: ``ref`` (step loop, the oracle), ``torch`` (chunked pure PyTorch), ``cpu`` (fused numba
kernels, needs numba) and ``cuda`` (mamba-ssm / causal-conv1d, CUDA tensors only).
"""

from .dispatch import (
    available_backends,
    causal_conv1d,
    get_backend,
    selective_scan,
    set_backend,
    use_backend,
)

__all__ = [
    "available_backends",
    "causal_conv1d",
    "get_backend",
    "selective_scan",
    "set_backend",
    "use_backend",
]
