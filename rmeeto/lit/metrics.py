"""Evaluation metrics of one model on one stage, reduced over ranks by torchmetrics."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, SumMetric
from torchmetrics.classification import MulticlassAccuracy


class EvalMetrics(nn.Module):
    """Top-1/top-5 accuracy, mean cross-entropy and the number of samples seen, logged as
    ``{prefix}/acc1``, ``{prefix}/acc5``, ``{prefix}/loss``, ``{prefix}/samples``.

    States are summed over ranks when computed (torchmetrics' default ``sync_on_compute``), so each
    rank may see a different number of batches and the result is still over the whole split.
    """

    def __init__(self, num_classes: int, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.acc5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")
        self.loss = MeanMetric()
        self.samples = SumMetric()

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """logits: B×K, labels: B (int64)."""
        logits = logits.float()
        self.acc1.update(logits, labels)
        self.acc5.update(logits, labels)
        self.loss.update(F.cross_entropy(logits, labels), weight=labels.numel())
        self.samples.update(float(labels.numel()))

    def as_dict(self) -> dict[str, Metric]:
        """Metric objects by logged name, for ``LightningModule.log_dict``."""
        return {f"{self.prefix}/{name}": metric for name, metric in self.named_children()}
