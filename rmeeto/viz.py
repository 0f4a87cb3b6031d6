"""Pictures: which patches each reduction point merged (the papers' merge figures), accuracy vs FLOPs.

Rendering uses matplotlib's Agg canvas through :class:`~matplotlib.figure.Figure` directly, so
importing this module changes no global backend and needs no display.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from rmeeto.models.vim import TokenState
from rmeeto.reduction import apply, attach
from rmeeto.reduction.reducer import TokenReduction

#: Group id of a patch whose token was dropped (pruning methods).
DROPPED = -1


def first_cls_index(state: TokenState) -> int:
    """Where cls sits in the first image of ``state``: ``cls_index`` is an int or a per-image (B,) tensor."""
    index = state.cls_index
    return int(index[0]) if isinstance(index, Tensor) and index.dim() else int(index)


def group_map(source: Tensor, cls_index: int, cls_origin: int, grid: tuple[int, int]) -> np.ndarray:
    """One image's N×N₀ source counts → H_p×W_p map: for each original patch, the index (in output
    order, cls excluded) of the token that holds it, or :data:`DROPPED`."""
    rows = torch.cat([source[:cls_index], source[cls_index + 1:]])  # (N−1)×N₀
    held = torch.cat([rows[:, :cls_origin], rows[:, cls_origin + 1:]], dim=1) > 0  # (N−1)×M₀
    ids = torch.where(held.any(0), held.float().argmax(0), DROPPED)
    return ids.reshape(grid).cpu().numpy()


def capture_states(model: nn.Module, reducer: TokenReduction, image: Tensor) -> list[TokenState]:
    """Run ``image`` (B×3×H×W) through ``model`` with ``reducer`` attached; the TokenState leaving
    each reduction point, in order. The model keeps ``reducer`` attached afterwards."""
    states: list[TokenState] = []

    def recording(block: int, state: TokenState) -> TokenState:
        out = reducer(block, state)
        if block in reducer.schedule.blocks:
            states.append(out)
        return out

    recording.inside_blocks = getattr(reducer, "inside_blocks", False)  # a ViT calls it where the reducer acts
    model.token_reducer = recording
    try:
        with torch.no_grad():
            model(image)
    finally:
        model.token_reducer = reducer
    return states


def merge_maps(model: nn.Module, image: Tensor, method: str = "rmeeto", **params: Any) -> dict[int, np.ndarray]:
    """Group maps of one image (3×H×W or 1×3×H×W) under ``method`` (``params`` as for
    :func:`rmeeto.reduction.apply`): block index of each reduction point → an H_p×W_p int array giving,
    for each patch, the output token (cls excluded) that holds it, or -1 where it was dropped.

    Works for any image model with ``cfg.img_size``/``patch_size`` wherever its cls token sits (Vim: the
    middle; VideoMamba, DeiT: first). The model's previous reducer, if any, is restored afterwards.
    """
    side = model.cfg.img_size // model.cfg.patch_size
    if model.cfg.num_patches != side * side:
        raise ValueError(f"merge_maps draws image models; this one has {model.cfg.num_patches} tokens besides "
                         f"cls for a {side}×{side} patch grid (a video model?)")
    image = image[None] if image.dim() == 3 else image
    if image.shape[0] != 1:
        raise ValueError(f"merge_maps draws one image, got a batch of {image.shape[0]}")
    previous = model.token_reducer
    reducer = apply(model, method, track_source=True, **params)
    try:
        states = capture_states(model, reducer, image)
    finally:
        attach(model, previous)
    maps = {}
    for block, state in zip(reducer.schedule.blocks, states, strict=True):
        cls = first_cls_index(state)
        maps[block] = group_map(state.source[0], cls, cls_origin(state.source[0], cls), (side, side))
    return maps


def cls_origin(source: Tensor, cls_index: int) -> int:
    """Where cls was among the original tokens, read from N×N₀ source counts: the one token cls holds
    (cls is never merged)."""
    return int(source[cls_index].argmax())


def to_rgb(image: Tensor | np.ndarray) -> np.ndarray:
    """3×H×W / H×W×3 (any range, e.g. normalised) → H×W×3 float in [0, 1], min-max scaled."""
    arr = image.detach().cpu().float().numpy() if isinstance(image, Tensor) else np.asarray(image, float)
    arr = arr[0] if arr.ndim == 4 else arr
    arr = np.moveaxis(arr, 0, -1) if arr.shape[0] == 3 and arr.shape[-1] != 3 else arr
    low, high = arr.min(), arr.max()
    return (arr - low) / (high - low) if high > low else np.zeros_like(arr)


def upsample(ids: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """H_p×W_p group ids → H×W per pixel (nearest; H, W multiples of H_p, W_p)."""
    return np.kron(ids, np.ones((shape[0] // ids.shape[0], shape[1] // ids.shape[1]), dtype=ids.dtype))


def group_colours(rgb: np.ndarray, pixel_ids: np.ndarray) -> np.ndarray:
    """Each group of pixels painted with its mean colour; dropped pixels black."""
    ids, colours = pixel_ids.ravel(), rgb.reshape(-1, 3)
    kept = ids >= 0
    count = np.maximum(np.bincount(ids[kept]), 1)
    means = np.stack([np.bincount(ids[kept], weights=colours[kept, ch]) / count for ch in range(3)], -1)
    out = np.zeros_like(colours)
    out[kept] = means[ids[kept]]
    return out.reshape(rgb.shape)


def borders(pixel_ids: np.ndarray) -> np.ndarray:
    """H×W bool: pixels whose right or lower neighbour belongs to another group."""
    edge = np.zeros(pixel_ids.shape, dtype=bool)
    edge[:, :-1] |= pixel_ids[:, :-1] != pixel_ids[:, 1:]
    edge[:-1, :] |= pixel_ids[:-1, :] != pixel_ids[1:, :]
    return edge


def draw_merge_maps(image: Tensor | np.ndarray, maps: Mapping[int, np.ndarray], path: str | Path,
                    title: str | None = None) -> Path:
    """Save a PNG: the image, then one panel per reduction point (``maps``: block → group ids, as
    :func:`merge_maps` gives) with every group of patches in its mean colour, white borders between
    groups and dropped patches black; ``title`` (e.g. the method and the cut) above them all."""
    rgb = to_rgb(image)
    fig = Figure(figsize=(2.2 * (len(maps) + 1), 2.4 + 0.3 * bool(title)))
    axes = fig.subplots(1, len(maps) + 1, squeeze=False)[0]
    axes[0].imshow(rgb)
    axes[0].set_title("image", fontsize=8)
    for ax, (block, ids) in zip(axes[1:], maps.items(), strict=True):
        pixel_ids = upsample(ids, rgb.shape[:2])
        panel = group_colours(rgb, pixel_ids)
        panel[borders(pixel_ids)] = 1.0
        ax.imshow(panel)
        ax.set_title(f"before block {block}: {len(np.unique(ids[ids >= 0]))} groups", fontsize=8)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=120)
    return path


def plot_accuracy_vs_flops(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Save a PNG of top-1 against GFLOPs from eval rows (dicts with method, gflops, top1), one line
    per method through its points in order of GFLOPs."""
    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    for method in dict.fromkeys(row["method"] for row in rows):
        points = sorted((float(r["gflops"]), float(r["top1"])) for r in rows if r["method"] == method)
        ax.plot(*zip(*points, strict=True), marker="o", label=str(method))
    ax.set_xlabel("GFLOPs")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=120)
    return path
