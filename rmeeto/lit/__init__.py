"""Lightning re-training pipeline: the LightningModule, its optimiser/schedule, metrics and callbacks."""

from rmeeto.lit.callbacks import ExportCallback, FinalCheckpoint, ImageThroughput
from rmeeto.lit.module import RMeeToModule, distillation_loss

__all__ = ["ExportCallback", "FinalCheckpoint", "ImageThroughput", "RMeeToModule", "distillation_loss"]
