"""Bundled demo set: scikit-learn's digits (1797 real 8x8 grey scans, 10 classes; ships with sklearn).

Images are upscaled (bicubic) to ``size`` x ``size`` and stored as RGB JPEG shards with indexes:
a stratified 1437/360 train/val split (seed 0) in 4 train and 2 val shards. The normalisation mean/std
are computed from the upscaled train images and stored in the indexes (``WebDatasetDataModule`` picks
them up); all three channels share them since the images are grey.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from rmeeto.data.shards import index_path, read_index, write_shards

DEMO_SIZE = 64
SOURCE = "sklearn.datasets.load_digits"
SPLITS = {"train": 4, "val": 2}
VAL_SAMPLES = 360
SEED = 0
CLASSES = [str(digit) for digit in range(10)]


def digit_images(size: int = DEMO_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 images (N, size, size) and labels (N,), rescaled from 0..16 to 0..255."""
    digits = load_digits()
    pixels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    resized = [np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BICUBIC)) for p in pixels]
    return np.stack(resized), digits.target.astype(np.int64)


def write_demo_shards(out_dir: str | os.PathLike, size: int = DEMO_SIZE) -> Path:
    """Write the demo train/val shards and indexes to ``out_dir`` (overwriting) and return it."""
    out = Path(out_dir)
    images, labels = digit_images(size)
    train_ids, val_ids = train_test_split(np.arange(len(labels)), test_size=VAL_SAMPLES, stratify=labels,
                                          random_state=SEED)
    train_pixels = images[train_ids] / 255.0
    mean, std = (float(train_pixels.mean()),) * 3, (float(train_pixels.std()),) * 3
    for split, ids in (("train", train_ids), ("val", val_ids)):
        samples = ({"__key__": f"digit{i:04d}", "jpg": Image.fromarray(images[i]).convert("RGB"),
                    "cls": int(labels[i])} for i in ids)
        write_shards(samples, out, split, max_per_shard=-(-len(ids) // SPLITS[split]), classes=CLASSES,
                     mean=mean, std=std, meta={"source": SOURCE, "image_size": size})
    return out


def _is_complete(out: Path, size: int) -> bool:
    for split in SPLITS:
        if not index_path(out, split).is_file():
            return False
        index = read_index(out, split)
        if index.meta.get("source") != SOURCE or index.meta.get("image_size") != size:
            return False
        if not all((out / name).is_file() for name in index.shards):
            return False
    return True


def ensure_demo_shards(out_dir: str | os.PathLike, size: int = DEMO_SIZE) -> Path:
    """Return ``out_dir`` holding the demo shards of this ``size``, writing them only when missing or stale."""
    out = Path(out_dir)
    if not _is_complete(out, size):
        write_demo_shards(out, size)
    return out
