"""LightningModule that re-trains a token-reduced Vim (the R-MeeTo recipe)."""

from __future__ import annotations

import math
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.scheduler.scheduler import Scheduler
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.optim import Optimizer

import rmeeto.reduction
from rmeeto import flops
from rmeeto.data.transforms import mix, mixup_fn
from rmeeto.lit.metrics import EvalMetrics
from rmeeto.lit.optim import cosine_schedule, param_groups
from rmeeto.models import VisionMamba, create_model

#: (images B×3×H×W float, labels B int64)
Batch = tuple[Tensor, Tensor]


@dataclass
class Frozen:
    """Models the LightningModule uses but deliberately does not register as submodules.

    Registered, they would be wrapped by DDP, cast to bf16 by DeepSpeed (ruining an EMA), and stored
    in ``state_dict``, which is kept to the student alone (loadable with ``rmeeto.load_checkpoint``).
    The teacher is rebuilt from the same weights on every run; the EMA is checkpointed separately.
    """

    teacher: VisionMamba | None = None
    ema: ModelEmaV3 | None = None


def distillation_loss(student: Tensor, teacher: Tensor, tau: float = 1.0) -> Tensor:
    """KL term of the authors' R-MeeTo scripts on B×K logits:
    ``kl_div(log_softmax(student), log_softmax(teacher), log_target=True, reduction="batchmean")``,
    i.e. the batch mean of Σ p_t (log p_t − log p_s). ``tau`` softens both sides (times τ² to keep the
    gradient scale); τ = 1 is their setting."""
    log_p_student = F.log_softmax(student.float() / tau, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / tau, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * tau**2


def frozen_forward(model: nn.Module, images: Tensor) -> Tensor:
    """Logits of a frozen copy, inputs cast to its dtype (DeepSpeed hands bf16 batches to fp32 copies)."""
    return model(images.to(next(model.parameters()).dtype))


class RMeeToModule(L.LightningModule):
    """Vim ``model`` (with ``model_overrides``, weights from ``pretrained``) with the token reduction
    ``reduction`` attached (keyword arguments of :func:`rmeeto.reduction.apply`, e.g.
    ``{"method": "rmeeto", "r": 11}``), re-trained on ``(images, labels)`` batches.

    Optimisation: AdamW (no decay on norms, biases, D, A_log, pos_embed, cls_token), per-step cosine
    from ``lr`` to ``min_lr`` after ``warmup_steps`` of linear warm-up from ``warmup_lr``. Loss: soft
    target CE under timm Mixup/CutMix (``mixup``/``cutmix`` alphas, both 0 disables it; it needs even
    batch sizes), else label smoothing CE; with ``distill`` plus ``distill_weight`` ×
    :func:`distillation_loss` against the unreduced model with the same starting weights (frozen, eval
    mode). ``ema_decay`` keeps an EMA of the weights (validated as ``val_ema/*`` next to ``val/*``,
    saved in checkpoints).
    Gradient clipping and precision come from the Trainer.
    """

    def __init__(
        self,
        model: str = "vim_demo",
        model_overrides: dict[str, Any] | None = None,
        pretrained: str | None = None,
        reduction: dict[str, Any] | None = None,
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
        self.save_hyperparameters()
        self.model = create_model(model, pretrained=pretrained, **(model_overrides or {}))
        teacher = deepcopy(self.model).eval().requires_grad_(False) if distill else None
        if reduction:
            rmeeto.reduction.apply(self.model, **reduction)
        self.frozen = Frozen(teacher=teacher)
        self._restored_ema: dict[str, Tensor] | None = None
        self._skipped_before = 0  # the datamodule's skip counter when the current validation pass began
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
    def setup(self, stage: str) -> None:
        """Report the GFLOPs per image (papers' convention) of the reduced model once per run."""
        gflops = flops.count(self.model)
        rank_zero_info(f"{self.hparams.model} with reduction {self.hparams.reduction}: {gflops:.4f} GFLOPs/image")
        for logger in self.loggers:
            logger.log_metrics({"model/gflops": gflops}, step=0)

    def on_fit_start(self) -> None:
        self._prepare_frozen()

    def on_test_start(self) -> None:
        self._prepare_frozen()

    def _prepare_frozen(self) -> None:
        """Put the teacher on this device; build the fp32 EMA (here: after DDP has broadcast the
        weights) and load its restored state. Idempotent."""
        if self.frozen.teacher is not None:
            self.frozen.teacher.to(self.device)
        if self.hparams.ema_decay is not None and self.frozen.ema is None:
            self.frozen.ema = ModelEmaV3(self.model, decay=self.hparams.ema_decay, dtype=torch.float32)
            self.frozen.ema.requires_grad_(False)
        if self.frozen.ema is not None:
            self.frozen.ema.to(self.device)
            self._load_restored_ema()

    def _load_restored_ema(self) -> None:
        if self._restored_ema is not None and self.frozen.ema is not None:
            self.frozen.ema.module.load_state_dict(self._restored_ema)
            self._restored_ema = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.frozen.ema is not None:
            checkpoint["ema_state_dict"] = self.frozen.ema.module.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Called before on_fit_start (DDP) or after it (DeepSpeed): keep the state until the EMA exists.
        self._restored_ema = checkpoint.get("ema_state_dict")
        self._load_restored_ema()

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
                teacher_logits = frozen_forward(self.frozen.teacher, images)
            kd = distillation_loss(logits, teacher_logits, self.hparams.distill_tau)
            self.log_dict({"train/loss_cls": loss, "train/loss_kd": kd})
            loss = loss + self.hparams.distill_weight * kd
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Optimizer,
                       optimizer_closure: Callable[[], Any] | None = None) -> None:
        """The default step, then one EMA update (once per optimizer step, not per accumulated batch)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if self.frozen.ema is not None:
            self.frozen.ema.update(self.model)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=hp.lr)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError("the number of optimizer steps is unknown (endless train loader): set trainer.max_steps")
        scheduler = cosine_schedule(optimizer, int(total), hp.min_lr, hp.warmup_steps, hp.warmup_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Scheduler, metric: Any | None) -> None:
        scheduler.step_update(num_updates=self.global_step)

    # ----------------------------------------------------------------------------- evaluation
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _evaluate(self, batch: Batch, stage: str) -> None:
        images, labels = batch
        self._log_eval(self.metrics[stage], self.model(images), labels)
        if self.frozen.ema is not None:
            self._log_eval(self.metrics[f"{stage}_ema"], frozen_forward(self.frozen.ema.module, images), labels)

    def _log_eval(self, metrics: EvalMetrics, logits: Tensor, labels: Tensor) -> None:
        metrics.update(logits, labels)
        self.log_dict(metrics.as_dict(), on_step=False, on_epoch=True)

    def on_validation_start(self) -> None:
        self._prepare_frozen()
        self._skipped_before = getattr(self.trainer.datamodule, "val_skipped_samples", 0)

    def on_validation_epoch_end(self) -> None:
        """Exact-once check: a full validation pass over all ranks must see every sample exactly once
        (samples skipped as unreadable under ``on_error="skip"`` are counted as seen)."""
        datamodule = self.trainer.datamodule
        expected = getattr(datamodule, "val_num_samples", None)
        limit = self.trainer.limit_val_batches
        if expected is None or self.trainer.sanity_checking or not (isinstance(limit, float) and limit == 1.0):
            return
        skipped_here = getattr(datamodule, "val_skipped_samples", 0) - self._skipped_before
        skipped = round(float(self.trainer.strategy.reduce(torch.tensor(float(skipped_here), device=self.device),
                                                           reduce_op="sum")))
        seen = round(self.metrics["val"].samples.compute().item())
        if seen + skipped != expected:
            raise RuntimeError(
                f"validation saw {seen} samples (+{skipped} skipped as unreadable) over {self.trainer.world_size} "
                f"rank(s) but the split has {expected}: samples were dropped or repeated (check how the val "
                "loader splits data over ranks and workers)"
            )
