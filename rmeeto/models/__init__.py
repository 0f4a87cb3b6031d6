"""Vision Mamba backbone, registry (timm models with the public checkpoints as tags) and checkpoint loading."""

from rmeeto.models import deit  # noqa: F401  registers the demo DeiT
from rmeeto.models.checkpoint import CheckpointError, load_checkpoint
from rmeeto.models.mamba import frozen
from rmeeto.models.pretrained import PRETRAINED_CFGS
from rmeeto.models.registry import VARIANTS, create_model, model_config
from rmeeto.models.videomamba import VideoMamba, VideoMambaConfig  # registers the VideoMamba variants
from rmeeto.models.vim import TokenState, VimConfig, VisionMamba

__all__ = [
    "PRETRAINED_CFGS", "VARIANTS", "CheckpointError", "TokenState", "VideoMamba", "VideoMambaConfig", "VimConfig",
    "VisionMamba", "create_model", "frozen", "load_checkpoint", "model_config",
]
