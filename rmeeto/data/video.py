"""Video clips in webdataset shards and the DataModule that streams them.

Shards and indexes are those of :mod:`rmeeto.data.shards` (``{split}-NNNNNN.tar`` + ``{split}-index.json``);
a sample holds a clip instead of an image, in one of two layouts, plus ``<key>.cls``:

- ``<key>.npy``: one uint8 array T×H×W×3;
- ``<key>.<frame>.jpg`` (or .jpeg/.png/.webp): one image per frame, taken in name order (zero-pad the
  frame names: ``000.jpg``, ``001.jpg``, …).

Reading keeps the image pipeline's guarantees by being it (:mod:`rmeeto.data.pipelines` with ``check_clip``
and ``decode_clip``): training
deals each epoch's shard permutation to ranks and workers (``TrainStream``), repeats each reader's own
shards through a seeded shuffle buffer, stops every rank after the same number of full batches and resumes
mid-epoch (``ResumableLoader``); evaluation reads every clip exactly once over all ranks and workers.
Only the sample check (clip instead of image) and the decoding differ; failures are ``ShardError`` items
handled by the same ``ErrorPolicy``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms import functional as TF

from rmeeto.data.base import Triple
from rmeeto.data.reader import IMAGE_EXTENSIONS, OnError, Sample, check_label, decode_image
from rmeeto.data.shards import ShardError, ShardIndex, encode_jpeg, write_shards
from rmeeto.data.transforms import Augment
from rmeeto.data.webdataset_dm import WebDatasetDataModule

FrameFormat = Literal["npy", "jpg"]
#: clip augmentation: random-resized crop and flip only
CLIP_AUGMENT = Augment(auto_augment=None, reprob=0.0, color_jitter=0.0)


# ----------------------------------------------------------------------------- writing
def _encode_clip(key: str, clip: np.ndarray, label: int, frame_format: FrameFormat) -> dict[str, Any]:
    """A ``{"__key__", "npy" | "000.jpg", …, "cls"}`` record for ShardWriter."""
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3:
        raise ValueError(f"clip {key!r} must be a uint8 T×H×W×3 array, got {clip.dtype} {clip.shape}")
    if frame_format == "npy":
        buffer = io.BytesIO()
        np.save(buffer, clip, allow_pickle=False)
        files = {"npy": buffer.getvalue()}
    elif frame_format == "jpg":
        files = {f"{t:03d}.jpg": encode_jpeg(Image.fromarray(frame)) for t, frame in enumerate(clip)}
    else:
        raise ValueError(f"frame_format must be 'npy' or 'jpg', not {frame_format!r}")
    return {"__key__": key, **files, "cls": int(label)}


def write_clip_shards(
    samples: Iterable[tuple[str, np.ndarray, int]],
    out_dir: str | os.PathLike,
    split: str,
    max_per_shard: int = 100,
    *,
    frame_format: FrameFormat = "npy",
    num_classes: int,
    classes: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> ShardIndex:
    """Write ``(key, uint8 T×H×W×3 clip, label)`` samples with ``write_shards`` (shards of ``max_per_shard``
    clips, then the index, whose meta records the ``frame_format``)."""
    records = (_encode_clip(key, clip, label, frame_format) for key, clip, label in samples)
    return write_shards(records, out_dir, split, max_per_shard, num_classes=num_classes, classes=classes,
                        mean=mean, std=std, meta={"frame_format": frame_format, **(meta or {})})


# ----------------------------------------------------------------------------- reading
def check_clip(raw: Mapping[str, Any], shard: str, num_classes: int | None) -> Sample | ShardError:
    """A raw webdataset sample → ``{"key", "shard", "clip", "label"}`` (clip: .npy bytes or the frames'
    image bytes in name order) or the ``ShardError`` it has."""
    key = raw["__key__"]
    frames = sorted(name for name in raw if "." in name and name.rpartition(".")[2] in IMAGE_EXTENSIONS)
    if "npy" not in raw and not frames:
        return ShardError("sample has no clip (.npy or <frame>.jpg files)", shard, key)
    label = check_label(raw, shard, num_classes)
    if isinstance(label, ShardError):
        return label
    clip = raw["npy"] if "npy" in raw else [raw[name] for name in frames]
    return {"key": key, "shard": shard, "clip": clip, "label": label}


def decode_clip(sample: Sample) -> np.ndarray:
    """The sample's clip as a uint8 T×H×W×3 array; anything else raises ``ShardError``."""
    payload = sample["clip"]
    try:
        if isinstance(payload, bytes):
            clip = np.load(io.BytesIO(payload), allow_pickle=False)
        else:
            clip = np.stack([np.asarray(decode_image({**sample, "jpg": frame})) for frame in payload])
    except ShardError:
        raise
    except Exception as exn:  # numpy raises ValueError/OSError/EOFError; np.stack ValueError on mixed sizes
        raise ShardError(f"undecodable clip: {exn!r}", sample["shard"], sample["key"]) from exn
    if clip.dtype != np.uint8 or clip.ndim != 4 or clip.shape[-1] != 3 or len(clip) == 0:
        raise ShardError(f"clip must be uint8 T×H×W×3, got {clip.dtype} {clip.shape}", sample["shard"],
                         sample["key"])
    return clip


# ----------------------------------------------------------------------------- transforms
def segment_indices(total: int, num_frames: int, random: bool) -> Tensor:
    """One frame from each of ``num_frames`` equal segments of a ``total``-frame clip ("sparse" sampling
    as in VideoMamba's Kinetics loader): a random frame per segment if ``random``, else the middle one.
    Clips shorter than ``num_frames`` repeat frames."""
    edges = torch.linspace(0, total, num_frames + 1)
    where = torch.rand(num_frames) if random else torch.full((num_frames,), 0.5)
    return (edges[:-1] + where * (edges[1:] - edges[:-1])).long().clamp(max=total - 1)


class ClipTransform:
    """uint8 T×H×W×3 clip → normalised float 3×num_frames×img_size×img_size.

    Training: random frame per segment, one random-resized crop (``crop_scale``, aspect 3/4–4/3) and one
    horizontal flip (probability ``hflip``) for all frames. Evaluation: middle frame per segment, resize of
    the short side to ``img_size``, centre crop. Mean/std default to ImageNet's.
    """

    def __init__(self, num_frames: int, img_size: int, train: bool, crop_scale: tuple[float, float] = (0.08, 1.0),
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, hflip: float = 0.5):
        self.num_frames, self.img_size, self.train, self.crop_scale = num_frames, img_size, train, crop_scale
        self.hflip = hflip
        self.mean = torch.tensor(mean or IMAGENET_DEFAULT_MEAN).view(3, 1, 1, 1)
        self.std = torch.tensor(std or IMAGENET_DEFAULT_STD).view(3, 1, 1, 1)

    def __call__(self, clip: np.ndarray) -> Tensor:
        frames = torch.from_numpy(clip[segment_indices(len(clip), self.num_frames, self.train).numpy()])
        video = frames.permute(0, 3, 1, 2)  # T×3×H×W
        size = [self.img_size, self.img_size]
        if self.train:
            top, left, height, width = RandomResizedCrop.get_params(video, list(self.crop_scale), [3 / 4, 4 / 3])
            video = TF.resized_crop(video, top, left, height, width, size, antialias=True)
            if torch.rand(()) < self.hflip:
                video = video.flip(-1)
        else:
            video = TF.center_crop(TF.resize(video, self.img_size, antialias=True), size)
        return (video.permute(1, 0, 2, 3).float() / 255 - self.mean) / self.std


# ----------------------------------------------------------------------------- DataModule
class VideoDataModule(WebDatasetDataModule):
    """Train/val loaders over clip shards; batches are ``(clips (B, 3, num_frames, img_size, img_size)
    float32, labels (B,) int64)``.

    Indexes, ``num_classes``/mean/std defaults, error policies, ``setup`` checks and the DDP guarantees are
    those of :class:`~rmeeto.data.WebDatasetDataModule`: every rank yields the same number of full training
    batches per epoch from disjoint shards, and validation sees every clip exactly once over all ranks and
    workers (``val_num_samples``). Augmentation: see :class:`ClipTransform`; of ``augment`` it uses
    ``crop_scale`` and ``hflip`` (``auto_augment``, ``reprob`` and ``color_jitter`` must stay off: they are
    image-only and would otherwise be silently ignored).
    """

    check = staticmethod(check_clip)
    decode = staticmethod(decode_clip)

    def __init__(
        self,
        root: str,
        train_split: str = "train",
        val_split: str = "val",
        num_frames: int = 8,
        img_size: int = 224,
        batch_size: int = 8,
        num_workers: int = 8,
        shuffle_buffer: int = 200,
        augment: Augment = CLIP_AUGMENT,
        mean: Triple | None = None,
        std: Triple | None = None,
        on_error: OnError = "raise",
        num_classes: int | None = None,
        seed: int | None = None,
    ) -> None:
        image_only = {name: getattr(augment, name) for name in ("auto_augment", "reprob", "color_jitter")}
        if any(image_only.values()):
            raise ValueError(f"clips take only augment.crop_scale and augment.hflip; turn off {image_only}")
        super().__init__(root, train_split, val_split, img_size=img_size, batch_size=batch_size,
                         num_workers=num_workers, shuffle_buffer=shuffle_buffer, augment=augment, mean=mean,
                         std=std, on_error=on_error, num_classes=num_classes, seed=seed)
        self.num_frames = num_frames

    def transform(self, train: bool) -> ClipTransform:
        return ClipTransform(self.num_frames, self.img_size, train, tuple(self.augment.crop_scale), self.mean,
                             self.std, self.augment.hflip)
