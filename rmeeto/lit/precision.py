"""Frozen fp32 copies (distillation teacher, EMA) run in the training precision, not in full fp32."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The low-precision dtype a Trainer ``precision`` trains in: bf16 for ``"bf16-mixed"``/``"bf16-true"``, fp16
    for ``"16-mixed"``/``"16-true"``, None for 32/64-bit runs."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def frozen_forward(model: nn.Module, images: Tensor, dtype: torch.dtype | None) -> Tensor:
    """B×3×H×W images → B×K logits of a frozen fp32 copy, under autocast to ``dtype`` when the run trains in low
    precision. The autocast is explicit because DeepSpeed trains a bf16 model without one: inputs arrive in bf16 and
    a plain fp32 forward of the copy would run at fp32 speed."""
    images = images.float()
    with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
        return model(images)


def enable_tf32() -> None:
    """TF32 tensor cores for the fp32 matmuls of a GPU run (fp32 parts of a mixed-precision step; cuDNN
    convolutions use TF32 by default). Called for CUDA runs only, so CPU results do not change. The generic API:
    torch ≥ 2.9 refuses a mix of its per-backend flags and the legacy ones that Lightning still reads."""
    torch.set_float32_matmul_precision("high")
