"""AdamW parameter groups and the per-step cosine schedule of the R-MeeTo re-training recipe."""

from __future__ import annotations

import warnings

from timm.optim import param_groups_weight_decay
from timm.scheduler import CosineLRScheduler
from torch import nn
from torch.optim import Optimizer

from rmeeto.models import VisionMamba

#: SSM parameters that, like norms and biases, get no weight decay (Vim's and Mamba's convention).
SSM_NO_DECAY = ("*.A_log", "*.A_b_log", "*.D", "*.D_b")


def param_groups(model: VisionMamba | nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and undecayed 1-D params (norms, biases, D) plus pos_embed,
    cls_token (``model.no_weight_decay()``) and A_log/A_b_log. Frozen parameters are left out."""
    skip = set(getattr(model, "no_weight_decay", set)()) | set(SSM_NO_DECAY)
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


def cosine_schedule(optimizer: Optimizer, total_steps: int, min_lr: float, warmup_steps: int = 0,
                    warmup_lr: float = 1e-6) -> CosineLRScheduler:
    """Per-optimizer-step schedule: linear warm-up from ``warmup_lr`` over ``warmup_steps``, then cosine
    from the optimizer's lr down to ``min_lr`` at ``total_steps``; call ``step_update(global_step)``.

    timm's scheduler (the one the authors' script uses) rather than torch's LambdaLR: it takes the
    warm-up start and the floor as plain numbers and its state round-trips through Lightning checkpoints.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be ≥ 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be ≥ 0, got {warmup_steps}")
    if warmup_steps >= total_steps:  # e.g. fast_dev_run: keep the run going, say so
        warnings.warn(f"warmup_steps={warmup_steps} ≥ total_steps={total_steps}; warming up for "
                      f"{total_steps - 1} steps instead", stacklevel=2)
        warmup_steps = total_steps - 1
    return CosineLRScheduler(
        optimizer,
        t_initial=total_steps - warmup_steps,
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=warmup_lr,
        warmup_prefix=True,
        t_in_epochs=False,
    )
