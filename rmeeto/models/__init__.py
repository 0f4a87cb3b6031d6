"""Vision Mamba backbone, registry and checkpoint loading."""

from rmeeto.models.checkpoint import CheckpointError, load_checkpoint
from rmeeto.models.registry import VARIANTS, create_model, model_config
from rmeeto.models.vim import TokenState, VimConfig, VisionMamba

__all__ = [
    "VARIANTS", "CheckpointError", "TokenState", "VimConfig", "VisionMamba",
    "create_model", "load_checkpoint", "model_config",
]
