"""Model registry: ``create_model(name, pretrained=None, **overrides)``, also visible to timm."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm.models
from torch import nn

from rmeeto.models.vim import VimConfig, VisionMamba

#: Published variants (methods.md §1) plus a tiny one for the bundled demo and the tests.
VARIANTS: dict[str, VimConfig] = {
    "vim_tiny": VimConfig(embed_dim=192),
    "vim_small": VimConfig(embed_dim=384),
    "vim_base": VimConfig(embed_dim=768),
    "vim_demo": VimConfig(img_size=64, patch_size=8, embed_dim=64, depth=8, num_classes=10),
}
#: Names under which the same models are registered in timm.
TIMM_NAMES = {
    "vim_tiny": "vim_tiny_patch16_224_midclstok",
    "vim_small": "vim_small_patch16_224_midclstok",
    "vim_base": "vim_base_patch16_224_midclstok",
    "vim_demo": "vim_demo_patch8_64",
}
_ALIASES = {
    "vim_t": "vim_tiny", "vim-ti": "vim_tiny", "vim_ti": "vim_tiny",
    "vim_s": "vim_small", "vim-s": "vim_small", "vim_b": "vim_base", "vim-b": "vim_base",
    **{timm_name: name for name, timm_name in TIMM_NAMES.items()},
}


#: Config class → model class. Other families (VideoMamba) add themselves with :func:`register_family`.
MODEL_CLASSES: dict[type, type[VisionMamba]] = {VimConfig: VisionMamba}


def register_family(variants: dict[str, VimConfig], model_class: type[VisionMamba]) -> None:
    """Make ``variants`` (name → config, all of one config class) buildable by :func:`create_model` and timm."""
    VARIANTS.update(variants)
    for cfg_class in {type(cfg) for cfg in variants.values()}:
        MODEL_CLASSES[cfg_class] = model_class
    for name in variants:
        TIMM_NAMES.setdefault(name, name)
        _register_timm(name)


def resolve_name(name: str) -> str:
    """Canonical variant name for ``name`` or an alias; ValueError listing the known names otherwise."""
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(VARIANTS))}")
    return key


def model_config(name: str, **overrides: Any) -> VimConfig:
    """The variant's config with ``overrides`` (img_size, depth, num_classes, …) applied."""
    cfg = VARIANTS[resolve_name(name)]
    known = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; known: {sorted(known)}")
    return dataclasses.replace(cfg, **overrides)


def create_model(name: str, pretrained: str | Path | None = None, **overrides: Any) -> VisionMamba:
    """Build a Vim variant; ``pretrained`` is a checkpoint path loaded with strict key matching."""
    cfg = model_config(name, **overrides)
    model = MODEL_CLASSES[type(cfg)](cfg)
    if pretrained:
        from rmeeto.models.checkpoint import load_checkpoint

        load_checkpoint(model, pretrained)
    return model


def _timm_entry(name: str) -> Callable[..., nn.Module]:
    def build(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
        file = kwargs.pop("pretrained_file", None)
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm plumbing we do not use
            kwargs.pop(key, None)
        if pretrained and not file:
            raise ValueError(f"{name}: no download here; pass pretrained_file=<path to checkpoint>")
        return create_model(name, pretrained=file, **kwargs)

    build.__name__ = TIMM_NAMES[name]
    build.__doc__ = f"rmeeto {name} (see rmeeto.models.registry)."
    return build


def _register_timm(name: str) -> None:
    if TIMM_NAMES[name] not in timm.models.list_models():
        timm.models.register_model(_timm_entry(name))


for _name in VARIANTS:
    _register_timm(_name)
