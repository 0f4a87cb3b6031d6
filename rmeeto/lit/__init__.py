"""Lightning re-training pipeline: the LightningModule, its optimiser/schedule, metrics and callbacks."""

from rmeeto.lit.callbacks import EMA, ExactOnceValidation, ExportCallback, FinalCheckpoint, FrozenEval, ImageThroughput
from rmeeto.lit.module import RMeeToModule, distillation_loss
from rmeeto.lit.reduction_config import Reduction

__all__ = ["EMA", "ExactOnceValidation", "ExportCallback", "FinalCheckpoint", "FrozenEval", "ImageThroughput",
           "Reduction", "RMeeToModule", "distillation_loss"]
