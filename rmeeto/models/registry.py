"""Model registry: ``create_model(name, pretrained=None, **overrides)``, the same models in timm's registry.

Every variant is a timm model (``@register_model`` entry point, ``pretrained_cfg`` per checkpoint tag from
:mod:`rmeeto.models.pretrained`), so these are equivalent::

    rmeeto.create_model("vim_small", pretrained=True)
    timm.create_model("vim_small_patch16_224_midclstok.in1k", pretrained=True)

``pretrained`` is None/False (random init), True (the tag's checkpoint, downloaded from the Hugging Face
Hub into the user's cache), a local checkpoint file or export directory, or ``"hf-hub:owner/name[/file]"``.
timm callers give a local file as ``pretrained_cfg_overlay=dict(file=...)``. Weights always go through
:func:`rmeeto.models.checkpoint.load_checkpoint` (safe unpickling, strict key and shape checks).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    is_model,
    register_model,
    resolve_pretrained_cfg,
    split_model_name_tag,
)

from rmeeto import hub
from rmeeto.models.checkpoint import CheckpointError, load_checkpoint
from rmeeto.models.pretrained import PAPER_FIELDS, PRETRAINED_CFGS, SOURCE_FIELDS, blank_cfg
from rmeeto.models.vim import VimConfig, VisionMamba

#: Published variants (methods.md §1), the stride-8 "Vim+" ones of the fine-tuned checkpoints, and a tiny one
#: for the bundled demo and the tests.
VARIANTS: dict[str, VimConfig] = {
    "vim_tiny": VimConfig(embed_dim=192),
    "vim_small": VimConfig(embed_dim=384),
    "vim_base": VimConfig(embed_dim=768),
    "vim_tiny_stride8": VimConfig(embed_dim=192, patch_stride=8),
    "vim_small_stride8": VimConfig(embed_dim=384, patch_stride=8),
    "vim_demo": VimConfig(img_size=64, patch_size=8, embed_dim=64, depth=8, num_classes=10),
}
#: Variant → its timm architecture name (variants added by :func:`register_family` keep their own name).
TIMM_NAMES = {
    "vim_tiny": "vim_tiny_patch16_224_midclstok",
    "vim_small": "vim_small_patch16_224_midclstok",
    "vim_base": "vim_base_patch16_224_midclstok",
    "vim_tiny_stride8": "vim_tiny_patch16_stride8_224_midclstok",
    "vim_small_stride8": "vim_small_patch16_stride8_224_midclstok",
    "vim_demo": "vim_demo_patch8_64",
}
#: Config class → model class. Other families (VideoMamba) add themselves with :func:`register_family`.
MODEL_CLASSES: dict[type, type[VisionMamba]] = {VimConfig: VisionMamba}
#: timm reads an architecture's pretrained configs from ``default_cfgs`` of the entry point's module.
default_cfgs = generate_default_cfgs(PRETRAINED_CFGS)


def register_family(variants: dict[str, VimConfig], model_class: type[VisionMamba]) -> None:
    """Make ``variants`` (name → config, all of one config class) buildable by :func:`create_model` and timm."""
    VARIANTS.update(variants)
    for cfg_class in {type(cfg) for cfg in variants.values()}:
        MODEL_CLASSES[cfg_class] = model_class
    for name in variants:
        TIMM_NAMES.setdefault(name, name)
        _register_timm(name)


def resolve_name(name: str) -> str:
    """Canonical variant name for a variant or timm architecture name (a ``.tag`` suffix is ignored);
    ValueError listing the known names otherwise."""
    key = split_model_name_tag(name.lower())[0]
    key = next((variant for variant, arch in TIMM_NAMES.items() if arch == key), key)
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


def create_model(name: str, pretrained: bool | str | Path | None = None, **overrides: Any) -> VisionMamba:
    """Build a variant (``name`` may carry a checkpoint tag: ``vim_small_patch16_224_midclstok.rmeeto_r11``).

    pretrained: None/False, True (the tag's public checkpoint from the Hub), a local checkpoint path, or
    ``"hf-hub:owner/name[@revision][/file]"``. The model carries timm's ``pretrained_cfg`` (mean/std, and the
    paper's ``paper_top1``/``paper_gflops`` when the weights are that public checkpoint).
    """
    variant = resolve_name(name)
    tag = split_model_name_tag(name)[1] or None
    overlay = None if isinstance(pretrained, bool) or pretrained is None else {"file": str(pretrained)}
    return _build(variant, pretrained=bool(pretrained), pretrained_cfg=tag, pretrained_cfg_overlay=overlay,
                  **overrides)


def _build(variant: str, pretrained: bool = False, pretrained_cfg: Any = None,
           pretrained_cfg_overlay: dict[str, Any] | None = None, cache_dir: Any = None,
           **overrides: Any) -> VisionMamba:
    """The timm entry point of ``variant``: resolve the pretrained config (tag and overlay, timm's way),
    build the model with timm's builder, then load the weights the config names with the strict loader."""
    if cache_dir is not None:
        raise ValueError("cache_dir: rmeeto models use the Hugging Face cache; set HF_HOME or HF_HUB_CACHE instead")
    arch = TIMM_NAMES[variant]
    cfg = resolve_pretrained_cfg(arch, pretrained_cfg, pretrained_cfg_overlay)
    own_source = not any((pretrained_cfg_overlay or {}).get(k) for k in SOURCE_FIELDS)
    if not (pretrained and own_source):  # the paper's numbers describe the registry's own checkpoint only
        cfg = dataclasses.replace(cfg, **{k: None for k in PAPER_FIELDS if hasattr(cfg, k)})
    model_class = MODEL_CLASSES[type(VARIANTS[variant])]
    model = build_model_with_cfg(lambda **kw: model_class(model_config(variant, **kw)), arch, pretrained=False,
                                 pretrained_cfg=cfg, **overrides)
    if pretrained:
        load_checkpoint(model, weights_location(model.pretrained_cfg))
    return model


def weights_location(cfg: dict[str, Any]) -> str:
    """Where a resolved pretrained config's weights are: its ``file``, else an ``hf-hub:`` reference built from
    ``hf_hub_id`` (``owner/name[@revision]``, timm's form) and ``hf_hub_filename`` or ``hf_hub_subfolder``."""
    if cfg.get("file"):
        return str(cfg["file"])
    if cfg.get("hf_hub_id"):
        path = cfg.get("hf_hub_filename") or cfg.get("hf_hub_subfolder") or ""
        return f"{hub.PREFIX}{cfg['hf_hub_id']}{'/' + path if path else ''}"
    name = ".".join(filter(None, (cfg.get("architecture"), cfg.get("tag"))))
    prefix = f"{cfg.get('architecture')}."
    tags = sorted(k for k, v in PRETRAINED_CFGS.items() if k.startswith(prefix) and v.has_weights)
    raise CheckpointError(f"{name}: no public checkpoint is known (tags with weights: {', '.join(tags) or 'none'}); "
                          "pass pretrained=<checkpoint path or hf-hub:owner/name/file>")


def _register_timm(variant: str) -> None:
    """``@register_model`` an entry point named after the variant's timm architecture."""
    arch = TIMM_NAMES[variant]
    if arch not in default_cfgs:
        default_cfgs.update(generate_default_cfgs({arch: blank_cfg()}))

    def entry(pretrained: bool = False, **kwargs: Any) -> VisionMamba:
        return _build(variant, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = arch
    entry.__doc__ = f"rmeeto {variant} (see rmeeto.models.registry)."
    if not is_model(arch):
        register_model(entry)


for _name in VARIANTS:
    _register_timm(_name)
