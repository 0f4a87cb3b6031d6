"""Tiny generated video set: moving digits made from scikit-learn's digits (real 8x8 scans, no download).

A clip is ``num_frames`` grey ``size`` x ``size`` frames in which one digit (upscaled to ``size // 2``) slides
in a straight line from one border to the opposite one; the label is the direction (``CLASSES``), so a
single frame does not tell the class. Clips are balanced over the classes, with random digits and
cross-axis offsets. Train clips are stored as ``.npy`` arrays and val clips as JPEG frames, so both clip
layouts of :mod:`rmeeto.data.video` are exercised; the index holds the train mean/std.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from rmeeto.data.demo import digit_images
from rmeeto.data.video import write_clip_shards

CLASSES = ["right", "left", "down", "up"]
SOURCE = "moving sklearn digits"


def moving_digit_clips(count: int, size: int = 32, num_frames: int = 8, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` clips uint8 (count, num_frames, size, size, 3) and their direction labels (count,)."""
    digits, _ = digit_images(size // 2)
    side = digits.shape[1]
    rng = np.random.default_rng(seed)
    path = np.rint(np.linspace(0, size - side, num_frames)).astype(int)  # positions along the motion
    clips = np.zeros((count, num_frames, size, size), dtype=np.uint8)
    labels = np.arange(count) % len(CLASSES)
    for clip, label in zip(clips, labels, strict=True):
        digit = digits[rng.integers(len(digits))]
        across = int(rng.integers(0, size - side + 1))
        along = path if label in (0, 2) else path[::-1]  # right/down: increasing; left/up: decreasing
        for frame, pos in zip(clip, along, strict=True):
            y, x = (across, pos) if label < 2 else (pos, across)
            frame[y:y + side, x:x + side] = digit
    return np.repeat(clips[..., None], 3, axis=-1), labels


def write_video_demo_shards(out_dir: str | os.PathLike, size: int = 32, num_frames: int = 8,
                            train: int = 128, val: int = 64, per_shard: int = 32) -> Path:
    """Write the train (``.npy``) and val (JPEG frames) shards with their indexes to ``out_dir``."""
    out = Path(out_dir)
    train_clips, train_labels = moving_digit_clips(train, size, num_frames, seed=0)
    val_clips, val_labels = moving_digit_clips(val, size, num_frames, seed=1)
    pixels = train_clips / 255.0
    mean, std = (float(pixels.mean()),) * 3, (float(pixels.std()),) * 3
    meta = {"source": SOURCE, "image_size": size, "num_frames": num_frames}
    for split, clips, labels, layout in (("train", train_clips, train_labels, "npy"),
                                         ("val", val_clips, val_labels, "jpg")):
        samples = zip([f"clip{i:04d}" for i in range(len(clips))], clips, labels.tolist(), strict=True)
        write_clip_shards(samples, out, split, per_shard, frame_format=layout, num_classes=len(CLASSES),
                          classes=CLASSES, mean=mean, std=std, meta=meta)
    return out
