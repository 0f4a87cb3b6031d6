"""Load Vim weights: public ``vim_*_midclstok_*.pth``, the authors' re-trained R-MeeTo checkpoints,
Lightning checkpoints of this project, bare state dicts and safetensors exports, with strict checks."""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model; the message names the file and the key."""


#: Containers in which training scripts nest the weights, in order of preference.
_NESTED_KEYS = ("model", "state_dict", "model_state_dict", "module")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file (``.pth``/``.pt``/``.ckpt``/``.safetensors``), an export directory, a DeepSpeed
    checkpoint directory (its fp32 weights), or an ``hf-hub:owner/name[@revision]/path`` reference (downloaded
    into the Hugging Face cache)."""
    from rmeeto import hub  # imported here: hub imports CheckpointError from this module

    if hub.is_hub_spec(path):
        path = hub.fetch(hub.parse(path))
    path = Path(path)
    if path.is_dir():
        from rmeeto.models.deepspeed_checkpoint import is_deepspeed_checkpoint, read_deepspeed_weights

        if is_deepspeed_checkpoint(path):
            return _unwrap(read_deepspeed_weights(path), path)
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    try:
        # The public Vim checkpoints pickle their argparse Namespace next to the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_torch_reason(err)})") from err
    return _unwrap(obj, path)


def _torch_reason(err: Exception) -> str:
    """The cause in torch's load error without its advice (its ``weights_only=False`` hint would tell the
    user to run arbitrary code from a file that is most likely just damaged)."""
    text = str(err)
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n|$)", text)
    if match:
        return f"the safe loader refuses it: {match.group(1).strip()}"
    return text.strip().splitlines()[0] if text.strip() else type(err).__name__


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    """Find the state dict inside a training checkpoint; strip Lightning's ``model.`` prefix."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for key in _NESTED_KEYS:
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found (top-level keys: {sorted(obj)[:8]})")
    for prefix in ("model.", "module."):
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], path: str | Path) -> None:
    """Raise CheckpointError naming the first missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if not (missing or unexpected or wrong):
        return
    problems = []
    if wrong:
        k = wrong[0]
        problems.append(
            f"shape mismatch at {k!r}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        )
    if missing:
        problems.append(f"{len(missing)} key(s) missing from the checkpoint, first {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) in the checkpoint, first {unexpected[0]!r}")
    hint = _variant_hint(state)
    raise CheckpointError(f"{path}: does not fit this model: " + "; ".join(problems) + hint)


def _variant_hint(state: Mapping[str, Tensor]) -> str:
    """' (looks like vim_small: embed dim 384, depth 24)' when the checkpoint's shape says so."""
    from rmeeto.models.registry import VARIANTS

    depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
    if "cls_token" not in state or depth == 0:  # not a Vim-style checkpoint (e.g. a ViT's ``blocks.*``)
        return ""
    dim = state["cls_token"].shape[-1]
    names = [n for n, c in VARIANTS.items() if c.embed_dim == dim and c.depth == depth]
    guess = f"looks like {names[0]}: " if names else ""
    return f" ({guess}embed dim {dim}, depth {depth})"


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load ``path`` into ``model`` with strict key and shape matching; returns the model."""
    state = read_state_dict(path)
    check_state_dict(model, state, path)
    model.load_state_dict(state, strict=True)
    return model
