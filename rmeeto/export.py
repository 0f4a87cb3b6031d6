"""Export a token-reduced Vim for inference without Lightning, and share it on the Hugging Face Hub.

    rmeeto.export.save(model_or_lit_module, "export/")   # export/model.safetensors + export/config.json
    model = rmeeto.export.load("export/")                # VisionMamba, reduction re-attached, eval mode
    rmeeto.export.push_to_hub("export/", "user/vim-s-rmeeto")   # + a generated README.md model card
    model = rmeeto.export.load("hf-hub:user/vim-s-rmeeto")

``config.json`` holds the architecture (every :class:`VimConfig` field), the reduction (method, its
options, schedule blocks/r/final_tokens), the input normalisation (``data.mean``/``data.std``) and
the sha256 of the weights file, so ``load`` needs no Lightning, no training config, gives the same logits
and refuses weights that are not the ones the config was written with. ``save`` writes a new folder and
renames it into place, so a failure never leaves new weights beside an old config. Problems raise
:class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

import rmeeto.reduction
from rmeeto import hub
from rmeeto.hub import file_sha256
from rmeeto.models import CheckpointError, VisionMamba, load_checkpoint
from rmeeto.models.checkpoint import check_state_dict
from rmeeto.models.pretrained import blank_cfg
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
    if len(set(schedule.r)) > 1:
        raise ValueError(f"cannot export a schedule with unequal r per block {schedule.r}")
    return {
        "method": METHOD_NAMES[type(reducer.method)],
        "options": {f.name: getattr(reducer.method, f.name) for f in dataclasses.fields(reducer.method) if f.init},
        "blocks": list(schedule.blocks),
        "r": list(schedule.r),
        "final_tokens": schedule.final_tokens,
        "track_source": reducer.track_source,
    }


def _unwrap(model: nn.Module, use_ema: bool) -> tuple[VisionMamba, str | None, Mapping[str, Tensor] | None]:
    """(Vim, variant name, EMA weights) of a VisionMamba or an RMeeToModule."""
    if isinstance(model, tuple(MODEL_CLASSES.values())):  # any registered family (Vim, VideoMamba, DeiT)
        name = next((n for n, cfg in VARIANTS.items() if cfg == model.cfg), None)
        return model, name, None
    # imported here: exporting a bare model needs no Lightning
    from rmeeto.lit.callbacks import ema_weights
    from rmeeto.lit.module import RMeeToModule

    if not isinstance(model, RMeeToModule):
        raise TypeError(f"expected a VisionMamba or an RMeeToModule, got {type(model).__name__}")
    return model.model, model.hparams.model, ema_weights(model) if use_ema else None


def save(model: nn.Module, directory: str | os.PathLike, *, ema_state: Mapping[str, Tensor] | None = None,
         extra: dict[str, Any] | None = None, use_ema: bool = True, mean: tuple[float, ...] | None = None,
         std: tuple[float, ...] | None = None) -> Path:
    """Write ``directory/model.safetensors`` (``ema_state`` if given, else the module's EMA when it has
    one and ``use_ema``, else the live weights) and ``directory/config.json``; returns ``directory``.

    ``extra``: JSON-serialisable notes stored under ``"extra"`` (``top1`` and ``dataset`` go on the model
    card). ``mean``/``std``: the input normalisation (default: the model's ``pretrained_cfg``, else ImageNet's).
    Both files are written to a new sibling folder that then replaces ``directory`` (other files already in
    ``directory`` are carried over); a failure part-way leaves ``directory`` as it was.
    """
    vim, name, module_ema = _unwrap(model, use_ema)
    state = ema_state if ema_state is not None else module_ema
    is_ema = state is not None
    if is_ema:
        check_state_dict(vim, state, "EMA state")
    else:
        state = vim.state_dict()
    out = Path(directory)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / WEIGHTS,
                  metadata={"format": "pt"})
        config = {
            "format": FORMAT,
            "version": VERSION,
            "model": {"name": name, "family": type(vim.cfg).__name__, "config": dataclasses.asdict(vim.cfg)},
            "reduction": reduction_settings(vim),
            "weights": {"file": WEIGHTS, "ema": is_ema, "sha256": file_sha256(tmp / WEIGHTS)},
            "data": normalisation(vim, mean, std),
            "extra": extra or {},
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def normalisation(model: nn.Module, mean: tuple[float, ...] | None, std: tuple[float, ...] | None
                  ) -> dict[str, list[float]]:
    """``{"mean": [...], "std": [...]}``: the given values, else the model's ``pretrained_cfg``'s, else ImageNet's."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = mean if mean is not None else cfg.get("mean", IMAGENET_DEFAULT_MEAN)
    std = std if std is not None else cfg.get("std", IMAGENET_DEFAULT_STD)
    if len(mean) != len(std):
        raise ValueError(f"mean {tuple(mean)} and std {tuple(std)} must have one value per channel")
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}


def _replace_dir(new: Path, out: Path) -> None:
    """Give ``new`` the usual permissions, carry over ``out``'s other files, then rename ``new`` to ``out``.

    An existing ``out`` is renamed aside first (a directory cannot be replaced in one rename) and removed
    once ``new`` is in place."""
    umask = os.umask(0)  # read the umask (there is no getter); restored on the next line
    os.umask(umask)
    os.chmod(new, 0o777 & ~umask)
    for path in new.iterdir():  # safetensors and mkdtemp create files private to the user
        os.chmod(path, 0o666 & ~umask)
    if not out.exists():
        os.rename(new, out)
        return
    for path in out.iterdir():
        if not (new / path.name).exists():
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, new / path.name)
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(new, out)
    shutil.rmtree(old, ignore_errors=True)


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
    """Rebuild the exported model with its weights and reduction, in eval mode. ``directory``: an export
    folder or ``"hf-hub:owner/name[@revision][/folder]"`` (downloaded into the Hugging Face cache).
    ``model.pretrained_cfg`` (timm's convention) holds the export's ``mean``/``std``."""
    if hub.is_hub_spec(directory):
        directory = download(directory)
    config = read_config(directory)
    path = Path(directory) / CONFIG
    try:
        cfg_class, model_class = FAMILIES[config["model"].get("family", "VimConfig")]
        model = model_class(cfg_class(**config["model"]["config"]))
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: bad model section ({err!r})") from err
    weights = Path(directory) / WEIGHTS
    expected = config.get("weights", {}).get("sha256")  # exports written before the hash have none
    if expected is not None and weights.is_file() and file_sha256(weights) != expected:
        raise CheckpointError(f"{weights}: these weights are not the ones {path} was written with (sha256 "
                              f"differs); the export is a mix of two saves, export again")
    load_checkpoint(model, weights)
    model.pretrained_cfg = _pretrained_cfg(config, path)
    reduction = config.get("reduction")
    if reduction:
        try:
            r = reduction["r"]
            rmeeto.reduction.apply(
                model, reduction["method"], r=r[0] if r else 0, blocks=reduction["blocks"],
                final_tokens=reduction["final_tokens"], track_source=reduction.get("track_source", False),
                **reduction["options"],
            )
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: bad reduction section ({err!r})") from err
    return model.eval()


def _pretrained_cfg(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """timm-style ``pretrained_cfg`` of an export: input size, classes, and its mean/std (ImageNet's if none)."""
    data = config.get("data") or {}
    arch = config["model"].get("name")
    model_cfg = config["model"]["config"]
    try:
        cfg = dataclasses.replace(
            blank_cfg(), architecture=arch, file=str(path.parent), num_classes=model_cfg["num_classes"],
            input_size=(model_cfg.get("in_chans", 3), model_cfg["img_size"], model_cfg["img_size"]),
            mean=tuple(float(v) for v in data.get("mean", IMAGENET_DEFAULT_MEAN)),
            std=tuple(float(v) for v in data.get("std", IMAGENET_DEFAULT_STD)))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad model or data section ({err!r})") from err
    return cfg.to_dict()


def download(spec: str | os.PathLike) -> Path:
    """The local folder holding the export at ``hf-hub:owner/name[@revision][/folder]`` (config, weights)."""
    ref = hub.parse(spec)
    prefix = f"{ref.path}/" if ref.path else ""
    config = hub.download(ref.repo_id, prefix + CONFIG, ref.revision)
    hub.download(ref.repo_id, prefix + WEIGHTS, ref.revision)
    return config.parent


def push_to_hub(export_dir: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
                revision: str | None = None) -> str:
    """Upload an export (weights, config and a generated README.md model card) to the Hub model repo
    ``repo_id`` (created if missing; branch ``revision`` created if missing) in one commit; returns the
    commit's URL. The export is loaded first, so a broken or mixed export is refused before any upload."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from rmeeto.flops import count, count_config

    directory = Path(export_dir)
    config = read_config(directory)
    model = load(directory)
    try:
        gflops = (count_config(model.cfg), count(model))
    except TypeError:  # a model family without a FLOPs formula: the card leaves GFLOPs out
        gflops = None
    card = hub.model_card(config, repo_id, gflops)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(directory / name))
                  for name in (WEIGHTS, CONFIG)]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    message = f"Upload rmeeto export of {config['model'].get('name') or 'a custom model'}"
    info = api.create_commit(repo_id, operations, commit_message=message, revision=revision)
    return str(info.commit_url)
