"""Export a token-reduced Vim for inference without Lightning.

    rmeeto.export.save(model_or_lit_module, "export/")   # export/model.safetensors + export/config.json
    model = rmeeto.export.load("export/")                # VisionMamba, reduction re-attached, eval mode

``config.json`` holds the architecture (every :class:`VimConfig` field) and the reduction (method,
its options, schedule blocks/amounts/final_tokens), so ``load`` needs no Lightning, no training config
and gives the same logits. Problems raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor, nn

import rmeeto.reduction
from rmeeto.models import CheckpointError, VisionMamba, load_checkpoint
from rmeeto.models.checkpoint import check_state_dict
from rmeeto.models.registry import MODEL_CLASSES, VARIANTS
from rmeeto.reduction import METHODS, TokenReduction

FORMAT = "rmeeto-export"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
#: Method class → name in ``rmeeto.reduction.METHODS`` whose factory is the class itself (takes all its fields).
METHOD_NAMES = {factory: name for name, factory in METHODS.items() if isinstance(factory, type)}
#: Config class name → (config class, model class), for every registered model family.
FAMILIES = {cfg_class.__name__: (cfg_class, model_class) for cfg_class, model_class in MODEL_CLASSES.items()}


def reduction_settings(model: VisionMamba) -> dict[str, Any] | None:
    """The model's reducer as JSON-ready settings (None without one)."""
    reducer = model.token_reducer
    if reducer is None:
        return None
    if not isinstance(reducer, TokenReduction) or type(reducer.method) not in METHOD_NAMES:
        raise TypeError(f"cannot export token reducer {reducer!r}: only rmeeto.reduction.apply's reducers")
    schedule = reducer.schedule
    if len(set(schedule.amounts)) > 1:
        raise ValueError(f"cannot export a schedule with unequal amounts {schedule.amounts}")
    return {
        "method": METHOD_NAMES[type(reducer.method)],
        "options": dataclasses.asdict(reducer.method),
        "blocks": list(schedule.blocks),
        "amounts": list(schedule.amounts),
        "final_tokens": schedule.final_tokens,
        "track_source": reducer.track_source,
    }


def _unwrap(model: nn.Module, use_ema: bool) -> tuple[VisionMamba, str | None, Mapping[str, Tensor] | None]:
    """(Vim, variant name, EMA weights) of a VisionMamba or an RMeeToModule."""
    if isinstance(model, tuple(MODEL_CLASSES.values())):  # any registered family (Vim, VideoMamba, DeiT)
        name = next((n for n, cfg in VARIANTS.items() if cfg == model.cfg), None)
        return model, name, None
    from rmeeto.lit.module import RMeeToModule  # imported here: exporting a bare model needs no Lightning

    if not isinstance(model, RMeeToModule):
        raise TypeError(f"expected a VisionMamba or an RMeeToModule, got {type(model).__name__}")
    ema = model.frozen.ema
    return model.model, model.hparams.model, ema.module.state_dict() if ema is not None and use_ema else None


def save(model: nn.Module, directory: str | os.PathLike, *, ema_state: Mapping[str, Tensor] | None = None,
         extra: dict[str, Any] | None = None, use_ema: bool = True) -> Path:
    """Write ``directory/model.safetensors`` (``ema_state`` if given, else the module's EMA when it has
    one and ``use_ema``, else the live weights) and ``directory/config.json``; returns ``directory``.
    ``extra``: JSON-serialisable notes stored under ``"extra"``."""
    vim, name, module_ema = _unwrap(model, use_ema)
    state = ema_state if ema_state is not None else module_ema
    is_ema = state is not None
    if is_ema:
        check_state_dict(vim, state, "EMA state")
    else:
        state = vim.state_dict()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, out / WEIGHTS, metadata={"format": "pt"})
    config = {
        "format": FORMAT,
        "version": VERSION,
        "model": {"name": name, "family": type(vim.cfg).__name__, "config": dataclasses.asdict(vim.cfg)},
        "reduction": reduction_settings(vim),
        "weights": {"file": WEIGHTS, "ema": is_ema},
        "extra": extra or {},
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of an export; CheckpointError naming the file when missing or invalid."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: export config not found (expected {CONFIG} next to {WEIGHTS})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an rmeeto export config (format is not {FORMAT!r})")
    if config.get("version") != VERSION:
        raise CheckpointError(f"{path}: export version {config.get('version')!r}, this code reads {VERSION}")
    return config


def load(directory: str | os.PathLike) -> VisionMamba:
    """Rebuild the exported model with its weights and reduction, in eval mode."""
    config = read_config(directory)
    path = Path(directory) / CONFIG
    try:
        cfg_class, model_class = FAMILIES[config["model"].get("family", "VimConfig")]
        model = model_class(cfg_class(**config["model"]["config"]))
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: bad model section ({err!r})") from err
    load_checkpoint(model, Path(directory) / WEIGHTS)
    reduction = config.get("reduction")
    if reduction:
        try:
            amounts = reduction["amounts"]
            rmeeto.reduction.apply(
                model, reduction["method"], r=amounts[0] if amounts else 0, blocks=reduction["blocks"],
                final_tokens=reduction["final_tokens"], track_source=reduction.get("track_source", False),
                **reduction["options"],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: bad reduction section ({err!r})") from err
    return model.eval()
