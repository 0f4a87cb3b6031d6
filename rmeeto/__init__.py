"""rmeeto: faster Vision Mamba by token merging (R-MeeTo) and training-free token reduction (MTR)."""

from rmeeto.models import CheckpointError, create_model, frozen, load_checkpoint

__all__ = ["CheckpointError", "create_model", "frozen", "load_checkpoint"]
__version__ = "0.1.0"
