"""Selective-scan and causal-conv1d kernels behind one dispatch API.

Backends: ``ref`` (step loop, the oracle), ``torch`` (chunked pure PyTorch), ``cpu`` (fused numba
kernels, needs numba) and ``cuda`` (mamba-ssm / causal-conv1d, CUDA tensors only).
"""

from .cuda import mamba_inner
from .dispatch import (
    available_backends,
    backend_summary,
    causal_conv1d,
    cpu_block_inputs,
    fused_add_norm,
    fused_block_cpu,
    fused_inner,
    fused_inner_cpu,
    fused_mixer_cpu,
    get_backend,
    selective_scan,
    set_backend,
    unavailable_backends,
    use_backend,
)
from .scan_cpu import (
    InnerParams,
    add_rms_norm_cpu,
    block_cpu,
    delta_record,
    mamba_inner_cpu,
    mamba_inner_cpu_grad,
    mixer_cpu,
    prepare_inner,
)

__all__ = [
    "InnerParams",
    "add_rms_norm_cpu",
    "available_backends",
    "backend_summary",
    "block_cpu",
    "causal_conv1d",
    "cpu_block_inputs",
    "delta_record",
    "fused_add_norm",
    "fused_block_cpu",
    "fused_inner",
    "fused_inner_cpu",
    "fused_mixer_cpu",
    "get_backend",
    "mamba_inner",
    "mamba_inner_cpu",
    "mamba_inner_cpu_grad",
    "mixer_cpu",
    "prepare_inner",
    "selective_scan",
    "set_backend",
    "unavailable_backends",
    "use_backend",
]
