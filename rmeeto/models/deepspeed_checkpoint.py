"""Weights of a DeepSpeed checkpoint directory, as Lightning's DeepSpeedStrategy writes ``last.ckpt/``:
``latest`` (the tag) and ``<tag>/mp_rank_00_model_states.pt`` plus one ``*zero_pp_rank_*_optim_states.pt`` per
rank, the fp32 master weights sharded over the ZeRO partitions."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from rmeeto.models.checkpoint import CheckpointError


def is_deepspeed_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a DeepSpeed checkpoint directory (it names its tag in a ``latest`` file)."""
    return path.is_dir() and (path / "latest").is_file()


def read_deepspeed_weights(path: Path) -> dict[str, Tensor]:
    """The fp32 weights of the checkpoint, gathered from the ZeRO partitions by DeepSpeed's own
    ``get_fp32_state_dict_from_zero_checkpoint`` (the module's bf16 copy would lose precision), keyed as the
    LightningModule's (``model.*``)."""
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError as err:
        raise CheckpointError(f"{path}: a DeepSpeed checkpoint; reading it needs deepspeed "
                              "(pip install -e '.[deepspeed]')") from err
    try:
        state = get_fp32_state_dict_from_zero_checkpoint(str(path))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable DeepSpeed checkpoint ({err})") from err
    # Lightning < 2.1 saved the module inside a wrapper whose attribute was _forward_module.
    return {k.removeprefix("_forward_module."): v for k, v in state.items()}
