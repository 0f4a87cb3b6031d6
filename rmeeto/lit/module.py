"""LightningModule that re-trains a token-reduced Vim (the R-MeeTo recipe)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler.scheduler import Scheduler
from torch import Tensor, nn

from rmeeto import flops
from rmeeto.data.transforms import mix, mixup_fn
from rmeeto.lit.callbacks import EMA, FrozenEval
from rmeeto.lit.metrics import EvalMetrics
from rmeeto.lit.optim import cosine_schedule, param_groups
from rmeeto.lit.precision import autocast_dtype, enable_tf32, frozen_forward
from rmeeto.lit.reduction_config import Reduction
from rmeeto.models import VisionMamba, create_model

#: (images B×3×H×W float, labels B int64)
Batch = tuple[Tensor, Tensor]


@dataclass
class Frozen:
    """The distillation teacher, deliberately not registered as a submodule: registered, it would be wrapped by
    DDP, cast to bf16 by DeepSpeed and stored in ``state_dict``, which is kept to the student alone (loadable with
    ``rmeeto.load_checkpoint``). It is rebuilt from the same weights on every run."""

    teacher: VisionMamba | None = None


def distillation_loss(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    """KL term of the authors' R-MeeTo scripts on B×K logits:
    ``kl_div(log_softmax(student), log_softmax(teacher), log_target=True, reduction="batchmean")``,
    i.e. the batch mean of Σ p_t (log p_t − log p_s). ``tau`` softens both sides (times τ² to keep the
    gradient scale); τ = 1 is their setting."""
    log_p_student = F.log_softmax(student.float() / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / tau, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * tau**2


class RMeeToModule(L.LightningModule):
    """Vim ``model`` (with ``model_overrides``, weights from ``pretrained``) with the token ``reduction`` attached
    (a :class:`Reduction`, or a mapping of its fields, e.g. ``{"method": "rmeeto", "r": 11}``), re-trained on
    ``(images, labels)`` batches.

    Optimisation: AdamW (no decay on norms, biases, D, A_log, pos_embed, cls_token), per-step cosine
    from ``lr`` to ``min_lr`` after ``warmup_steps`` of linear warm-up from ``warmup_lr``. Loss: soft
    target CE under timm Mixup/CutMix (``mixup``/``cutmix`` alphas, both 0 disables it; it needs even
    batch sizes), else label smoothing CE; with ``distill`` plus ``distill_weight`` ×
    :func:`distillation_loss` against the unreduced model with the same starting weights (frozen, eval
    mode, run in the training precision). ``ema_decay`` adds the :class:`~rmeeto.lit.callbacks.EMA` callback
    (an fp32 EMA of the weights, validated as ``val_ema/*`` next to ``val/*``, saved in checkpoints). Validation
    and test epochs run inside :func:`rmeeto.frozen` (the :class:`~rmeeto.lit.callbacks.FrozenEval` callback).
    Gradient clipping and precision come from the Trainer.
    """

    def __init__(
        self,
        model: str = "vim_demo",
        model_overrides: dict[str, Any] | None = None,
        pretrained: bool | str | None = None,
        reduction: Reduction | None = None,
        lr: float = 2e-5,
        min_lr: float = 1e-6,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        warmup_lr: float = 1e-6,
        label_smoothing: float = 0.1,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        distill: bool = False,
        distill_weight: float = 0.5,
        distill_tau: float = 1.0,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__()
        if isinstance(reduction, Mapping):
            reduction = Reduction(**reduction)
        self.save_hyperparameters()
        # Stored as plain data, so that checkpoints load with torch.load(weights_only=True).
        self.hparams["reduction"] = dataclasses.asdict(reduction) if reduction is not None else None
        self.model = create_model(model, pretrained=pretrained, **(model_overrides or {}))
        teacher = deepcopy(self.model).eval().requires_grad_(False) if distill else None
        if reduction is not None:
            reduction.apply(self.model)
        self.frozen = Frozen(teacher=teacher)
        num_classes = self.model.num_classes
        self.mixup = mixup_fn(num_classes, mixup, cutmix, label_smoothing)
        self.criterion: Callable[[Tensor, Tensor], Tensor]
        if self.mixup is not None:
            self.criterion = SoftTargetCrossEntropy()  # Mixup already smoothed the targets
        elif label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.metrics = nn.ModuleDict(
            {name: EvalMetrics(num_classes, name) for name in ("val", "val_ema", "test", "test_ema")}
        )
        # Read by ThroughputMonitor; None = no MFU, as our GFLOPs follow the papers' convention
        # (multiply-adds, one scan direction), not hardware FLOPs.
        self.flops_per_batch: float | None = None

    def forward(self, images: Tensor) -> Tensor:
        """B×3×H×W → B×num_classes logits of the (reduced) student."""
        return self.model(images)

    # ----------------------------------------------------------------------------- set-up
    def configure_callbacks(self) -> list[Callback]:
        return [FrozenEval()] + ([EMA(self.hparams.ema_decay)] if self.hparams.ema_decay is not None else [])

    def setup(self, stage: str) -> None:
        """Report the GFLOPs per image (papers' convention) of the reduced model once per run; TF32 on GPUs."""
        gflops = flops.count(self.model)
        rank_zero_info(f"{self.hparams.model} with reduction {self.hparams.reduction}: {gflops:.4f} GFLOPs/image")
        for logger in self.loggers:
            logger.log_metrics({"model/gflops": gflops}, step=0)
        if self.trainer.strategy.root_device.type == "cuda":
            enable_tf32()

    def on_fit_start(self) -> None:
        if self.frozen.teacher is not None:
            self.frozen.teacher.to(self.device)

    # ----------------------------------------------------------------------------- training
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, labels = batch
        targets = labels
        if self.mixup is not None:
            images, targets = mix(self.mixup, images, labels)
        logits = self.model(images)
        loss = self.criterion(logits, targets)
        if self.frozen.teacher is not None:
            with torch.no_grad():
                teacher_logits = frozen_forward(self.frozen.teacher, images, autocast_dtype(self.trainer.precision))
            kd = distillation_loss(logits, teacher_logits, self.hparams.distill_tau)
            self.log_dict({"train/loss_cls": loss, "train/loss_kd": kd})
            loss = loss + self.hparams.distill_weight * kd
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # fused: one kernel over all tensors, on CPU too (a Vim-S step 26 ms against 74 for the default per-tensor
        # loop on this project's 2 cores; the same update to ~1e-8)
        optimizer = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=hp.lr, fused=True)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the number of optimizer steps is unknown (endless train loader): set trainer.max_steps")
        scheduler = cosine_schedule(optimizer, int(total), hp.min_lr, hp.warmup_steps, hp.warmup_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Scheduler, metric: Any | None) -> None:
        scheduler.step_update(num_updates=self.global_step)

    # ----------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, labels = batch
        self.log_eval("val", self.model(images), labels)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        images, labels = batch
        self.log_eval("test", self.model(images), labels)

    def log_eval(self, name: str, logits: Tensor, labels: Tensor) -> None:
        """Add B×K ``logits`` against B ``labels`` to the metrics ``name`` ("val", "val_ema", "test", "test_ema"),
        logged per epoch and reduced over ranks."""
        metrics = self.metrics[name]
        metrics.update(logits, labels)
        self.log_dict(metrics.as_dict(), on_step=False, on_epoch=True)
