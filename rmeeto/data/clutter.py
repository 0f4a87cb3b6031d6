"""Cluttered digits: one scikit-learn digit at a random place on a larger, cluttered canvas.

The bundled demo (:mod:`rmeeto.data.demo`) fills the frame with one upscaled 8x8 digit, so nearly every
token carries part of the object and which tokens a reducer drops matters little. Here a digit
(``digit_size`` pixels square, 32 by default: 4x4 to 5x5 patches of 8) sits at a random position on a
``size`` x ``size`` canvas (64: 64 patches), so most tokens (39 to 48 of 64) are background, as in ImageNet photos.
The background is not empty: Gaussian noise plus a few fragments (small inked crops) of other digits
of the same split, dimmer than the digit and kept clear of it, so that the label stays that of the one
whole digit.

The split is the demo's (same stratified 1437/360 train/val digits, seed 0); fragments come from the
same split's digits only. Each train digit is placed ``train_copies`` times (different place and
clutter), each val digit once. Every sample is drawn from its own generator seeded by
``(SEED, split, digit id, copy)``, so a sample does not depend on how many others are written.
The digit is kept out of the border that the eval transform's center crop cuts off
(``rmeeto.data.transforms.EVAL_CROP_PCT``), so it is whole in the evaluated image too.

    python -m rmeeto.data.clutter --out data/clutter
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from rmeeto.data.demo import CLASSES, SEED, VAL_SAMPLES, digit_images
from rmeeto.data.shards import index_path, read_index, split_summary, write_shards
from rmeeto.data.transforms import EVAL_CROP_PCT

SOURCE = "rmeeto.data.clutter"
CLUTTER_SIZE = 64
DIGIT_SIZE = 32
TRAIN_COPIES = 4
SPLITS = {"train": 4, "val": 2}
SPLIT_NUMBERS = {"train": 0, "val": 1}  # part of each sample's seed

FRAGMENTS = (3, 6)  # fragments per image, inclusive range
FRAGMENT_SIDE = (6, 12)  # fragment height/width in pixels, inclusive range
FRAGMENT_GAIN = (0.3, 0.6)  # fragment intensity relative to a digit: dimmer, so the whole digit stands out
MIN_FRAGMENT_INK = 0.15  # least mean intensity (of 255) a fragment crop must have, so it is not blank
BACKGROUND_MEAN = 20.0  # noise level on 0..255
NOISE_STD = 12.0
CLEARANCE = 2  # pixels kept free of fragments around the digit
TRIES = 20  # rejection-sampling attempts per fragment (placement or inked crop)


@dataclass(frozen=True)
class ClutterSample:
    """One generated image: ``image`` (size x size uint8, grey), its ``label``, and the pasted digit's
    ``box`` (top, left, bottom, right; bottom/right exclusive) in canvas pixels."""

    key: str
    image: np.ndarray
    label: int
    box: tuple[int, int, int, int]


def split_ids(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Digit ids of the train/val splits: the demo's stratified split (same test size and seed)."""
    train, val = train_test_split(np.arange(len(labels)), test_size=VAL_SAMPLES, stratify=labels,
                                  random_state=SEED)
    return {"train": train, "val": val}


def crop_border(size: int) -> int:
    """Pixels per side that the eval transform's center crop (``EVAL_CROP_PCT``) removes, rounded up."""
    return math.ceil(size * (1 - EVAL_CROP_PCT) / 2)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _fragment(rng: np.random.Generator, donor: np.ndarray) -> np.ndarray | None:
    """An inked random crop (h x w, sides in ``FRAGMENT_SIDE``) of ``donor``, or None if none was found."""
    for _ in range(TRIES):
        h, w = (int(rng.integers(FRAGMENT_SIDE[0], FRAGMENT_SIDE[1] + 1)) for _ in range(2))
        top = int(rng.integers(0, donor.shape[0] - h + 1))
        left = int(rng.integers(0, donor.shape[1] - w + 1))
        crop = donor[top:top + h, left:left + w]
        if crop.mean() >= MIN_FRAGMENT_INK * 255:
            return crop
    return None


def compose(rng: np.random.Generator, digit: np.ndarray, donors: np.ndarray, size: int = CLUTTER_SIZE
            ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Paste ``digit`` (d x d uint8) on a noisy ``size`` x ``size`` canvas with fragments of ``donors``
    (M x d x d uint8) around it; return the uint8 canvas and the digit's box. Layers combine by maximum
    (bright strokes on a dark ground, like the digits themselves)."""
    d = digit.shape[0]
    border = crop_border(size)
    if d > size - 2 * border:
        raise ValueError(f"digit of {d} px does not fit a {size} px canvas inside the {border} px crop border")
    canvas = np.clip(rng.normal(BACKGROUND_MEAN, NOISE_STD, (size, size)), 0, 255)
    top, left = (int(rng.integers(border, size - border - d + 1)) for _ in range(2))
    box = (top, left, top + d, left + d)
    keep_out = (top - CLEARANCE, left - CLEARANCE, top + d + CLEARANCE, left + d + CLEARANCE)
    for _ in range(int(rng.integers(FRAGMENTS[0], FRAGMENTS[1] + 1))):
        piece = _fragment(rng, donors[rng.integers(len(donors))])
        if piece is None:
            continue
        h, w = piece.shape
        gain = rng.uniform(*FRAGMENT_GAIN)
        for _ in range(TRIES):
            y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            if not _overlaps((y, x, y + h, x + w), keep_out):
                region = canvas[y:y + h, x:x + w]
                np.maximum(region, piece * gain, out=region)
                break
    region = canvas[top:top + d, left:left + d]
    np.maximum(region, digit, out=region)
    return np.rint(canvas).astype(np.uint8), box


def clutter_samples(split: str, size: int = CLUTTER_SIZE, digit_size: int = DIGIT_SIZE,
                    copies: int | None = None, limit: int | None = None) -> Iterator[ClutterSample]:
    """The samples of ``split`` ("train" or "val") in order: every digit of the split ``copies`` times
    (default: ``TRAIN_COPIES`` for train, 1 for val); ``limit`` stops after that many samples."""
    if split not in SPLIT_NUMBERS:
        raise ValueError(f"unknown split {split!r}; known: {sorted(SPLIT_NUMBERS)}")
    copies = copies if copies is not None else (TRAIN_COPIES if split == "train" else 1)
    if copies < 1:
        raise ValueError(f"copies must be >= 1, got {copies}")
    digits, labels = digit_images(digit_size)
    ids = split_ids(labels)[split]
    donors = digits[ids]
    count = 0
    for copy in range(copies):
        for i in ids:
            if limit is not None and count >= limit:
                return
            rng = np.random.default_rng([SEED, SPLIT_NUMBERS[split], int(i), copy])
            image, box = compose(rng, digits[i], donors, size)
            yield ClutterSample(f"clutter{int(i):04d}_{copy}", image, int(labels[i]), box)
            count += 1


def _meta(size: int, digit_size: int, train_copies: int) -> dict[str, Any]:
    return {"source": SOURCE, "image_size": size, "digit_size": digit_size, "train_copies": train_copies}


def write_clutter_shards(out_dir: str | os.PathLike, size: int = CLUTTER_SIZE, digit_size: int = DIGIT_SIZE,
                         train_copies: int = TRAIN_COPIES) -> Path:
    """Write the cluttered-digits train/val shards and indexes to ``out_dir`` (overwriting) and return it.

    The indexes hold the train images' mean/std (one grey value for all three channels) and the
    generator settings in ``meta``."""
    out = Path(out_dir)
    meta = _meta(size, digit_size, train_copies)
    train = list(clutter_samples("train", size, digit_size, train_copies))
    pixels = np.stack([s.image for s in train]) / 255.0
    mean, std = (float(pixels.mean()),) * 3, (float(pixels.std()),) * 3
    for split, samples in (("train", iter(train)), ("val", clutter_samples("val", size, digit_size))):
        total = len(train) if split == "train" else VAL_SAMPLES
        rows = ({"__key__": s.key, "jpg": Image.fromarray(s.image).convert("RGB"), "cls": s.label}
                for s in samples)
        write_shards(rows, out, split, max_per_shard=-(-total // SPLITS[split]), classes=CLASSES,
                     mean=mean, std=std, meta=meta)
    return out


def _is_complete(out: Path, meta: dict[str, Any]) -> bool:
    """Whether both splits' indexes exist, were written with ``meta`` and list only existing shards."""
    for split in SPLITS:
        if not index_path(out, split).is_file():
            return False
        index = read_index(out, split)
        if index.meta != meta or not all((out / name).is_file() for name in index.shards):
            return False
    return True


def ensure_clutter_shards(out_dir: str | os.PathLike, size: int = CLUTTER_SIZE, digit_size: int = DIGIT_SIZE,
                          train_copies: int = TRAIN_COPIES) -> Path:
    """Return ``out_dir`` holding the cluttered-digits shards of these settings, writing them only when
    missing or stale."""
    out = Path(out_dir)
    if not _is_complete(out, _meta(size, digit_size, train_copies)):
        write_clutter_shards(out, size, digit_size, train_copies)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the cluttered-digits shards with their indexes.")
    parser.add_argument("--out", type=Path, default=Path("data/clutter"))
    parser.add_argument("--size", type=int, default=CLUTTER_SIZE, help="canvas side in pixels")
    parser.add_argument("--digit-size", type=int, default=DIGIT_SIZE, help="digit side in pixels")
    parser.add_argument("--train-copies", type=int, default=TRAIN_COPIES, help="placements per train digit")
    parser.add_argument("--force", action="store_true", help="rewrite even if complete shards are there")
    args = parser.parse_args(argv)
    settings = (args.size, args.digit_size, args.train_copies)
    out = write_clutter_shards(args.out, *settings) if args.force else ensure_clutter_shards(args.out, *settings)
    for split in SPLITS:
        print(split_summary(out, split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
