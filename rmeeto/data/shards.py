"""Shard format: webdataset tar shards ``{split}-NNNNNN.tar`` plus a ``{split}-index.json`` beside them.

A sample is ``{"__key__": str, "jpg": JPEG bytes, "cls": int}``. The index records per-shard sample
counts, the total, ``num_classes`` and optionally class names and the normalisation mean/std; it is
written last and atomically, so its presence marks a complete split.
"""

from __future__ import annotations

import io
import itertools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

SHARD_PATTERN = "{split}-%06d.tar"
PART_SUFFIX = ".part"
JPEG_QUALITY = 95


class ShardError(RuntimeError):
    """A shard or one of its samples cannot be read; the message names the shard file and the sample key."""

    def __init__(self, reason: str, shard: str | os.PathLike | None = None, key: str | None = None,
                 lost: int = 1) -> None:
        self.reason = reason
        self.shard = None if shard is None else str(shard)
        self.key = key
        self.lost = lost
        where = [f"shard {self.shard}"] if self.shard is not None else []
        if key is not None:
            where.append(f"sample {key!r}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)


@dataclass
class ShardIndex:
    """Contents of ``{split}-index.json``: shard file names (relative to the index) with their sample counts."""

    split: str
    shards: dict[str, int]
    num_classes: int
    classes: list[str] | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(self.shards.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "mean": self.mean,
            "std": self.std,
            "meta": self.meta,
            "shards": [{"file": name, "num_samples": n} for name, n in self.shards.items()],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ShardIndex:
        index = cls(
            split=data["split"],
            shards={s["file"]: int(s["num_samples"]) for s in data["shards"]},
            num_classes=int(data["num_classes"]),
            classes=data.get("classes"),
            mean=tuple(data["mean"]) if data.get("mean") else None,
            std=tuple(data["std"]) if data.get("std") else None,
            meta=dict(data.get("meta") or {}),
        )
        if "num_samples" in data and int(data["num_samples"]) != index.num_samples:
            raise ValueError(f"num_samples {data['num_samples']} != sum of shard counts {index.num_samples}")
        return index


def split_summary(root: str | os.PathLike, split: str) -> str:
    """One line on a written split, from its index: samples, shards and normalisation (what the writers print)."""
    index = read_index(root, split)
    return (f"{root}/{split}: {index.num_samples} samples, {len(index.shards)} shards, "
            f"mean {index.mean[0]:.4f} std {index.std[0]:.4f}")


def index_path(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / f"{split}-index.json"


def shard_name(split: str, number: int) -> str:
    return SHARD_PATTERN.format(split=split) % number


def read_index(root: str | os.PathLike, split: str) -> ShardIndex:
    """Load ``root/{split}-index.json``; a missing or malformed index raises ``FileNotFoundError``/``ValueError``."""
    path = index_path(root, split)
    if not path.is_file():
        raise FileNotFoundError(f"no shard index {path}: write the split with data/make_shards.py first")
    try:
        return ShardIndex.from_json(json.loads(path.read_text()))
    except (KeyError, TypeError, ValueError) as exn:
        raise ValueError(f"malformed shard index {path}: {exn!r}") from exn


def write_index(root: str | os.PathLike, index: ShardIndex) -> Path:
    """Write the index atomically (temp file + rename) and return its path."""
    path = index_path(root, index.split)
    tmp = path.with_name(path.name + PART_SUFFIX)
    tmp.write_text(json.dumps(index.to_json(), indent=1))
    os.replace(tmp, path)
    return path


def encode_jpeg(image: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    """Encode a PIL image as RGB (or greyscale) JPEG bytes."""
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _encode_sample(sample: Mapping[str, Any]) -> dict[str, Any]:
    """Check a ``{"__key__", "cls", <files>}`` sample and turn it into what ShardWriter stores: a PIL image
    under ``"jpg"`` becomes JPEG bytes, the label an int; other files (clips' ``.npy``/frames) pass as given."""
    key = sample["__key__"]
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must not contain '.' or '/' (webdataset splits keys there)")
    record = {**sample, "cls": int(sample["cls"])}
    if record["cls"] < 0:
        raise ValueError(f"sample {key!r}: negative label {record['cls']}")
    if isinstance(record.get("jpg"), Image.Image):
        record["jpg"] = encode_jpeg(record["jpg"])
    return record


def completed_shards(out_dir: str | os.PathLike, split: str) -> int:
    """Number of consecutive finished shards ``0..k-1`` of a split (unfinished ones still end in ``.part``)."""
    count = 0
    while (Path(out_dir) / shard_name(split, count)).is_file():
        count += 1
    return count


def write_shards(
    samples: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    split: str,
    max_per_shard: int = 1000,
    *,
    num_classes: int | None = None,
    classes: Sequence[str] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    meta: Mapping[str, Any] | None = None,
    start_shard: int = 0,
) -> ShardIndex:
    """Write ``samples`` (images: ``{"__key__", "jpg", "cls"}``; clips: see ``rmeeto.data.video``) as
    ``out_dir/{split}-NNNNNN.tar`` shards of ``max_per_shard`` samples, then the index.

    Each shard is written to ``*.tar.part`` and renamed when complete. ``start_shard=k`` resumes an
    interrupted run: shards ``0..k-1`` must exist, each holding ``max_per_shard`` samples, and
    ``samples`` yields what follows them. ``num_classes`` defaults to ``len(classes)`` or max label + 1.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    missing = [n for n in range(start_shard) if not (out / shard_name(split, n)).is_file()]
    if missing:
        raise FileNotFoundError(f"cannot resume {split} at shard {start_shard}: shards {missing} are missing")
    stream = iter(samples)
    first = next(stream, None)
    if first is None and start_shard == 0:
        raise ValueError(f"no samples to write for split {split!r}")
    max_label = -1
    written = 0
    if first is not None:
        pattern = str(out / (SHARD_PATTERN.format(split=split) + PART_SUFFIX))
        with wds.ShardWriter(pattern, maxcount=max_per_shard, maxsize=float("inf"), post=_finish_shard,
                             start_shard=start_shard, verbose=0, mtime=0.0) as writer:
            for sample in itertools.chain([first], stream):
                encoded = _encode_sample(sample)
                max_label = max(max_label, encoded["cls"])
                writer.write(encoded)
            written = writer.total
    counts = {shard_name(split, n): max_per_shard for n in range(start_shard)}
    for n in range(-(-written // max_per_shard)):
        counts[shard_name(split, start_shard + n)] = min(max_per_shard, written - n * max_per_shard)
    if num_classes is None:
        num_classes = len(classes) if classes is not None else max_label + 1
    if max_label >= num_classes:
        raise ValueError(f"label {max_label} out of range for num_classes={num_classes}")
    index = ShardIndex(
        split=split, shards=counts, num_classes=num_classes,
        classes=list(classes) if classes is not None else None,
        mean=tuple(mean) if mean is not None else None,
        std=tuple(std) if std is not None else None,
        meta=dict(meta or {}),
    )
    write_index(out, index)
    return index


def _finish_shard(part_path: str) -> None:
    """ShardWriter ``post`` hook: a closed shard drops its ``.part`` suffix."""
    os.replace(part_path, part_path[: -len(PART_SUFFIX)])


def is_pattern(source: str | os.PathLike) -> bool:
    """Whether ``source`` names shards directly (``train-{000000..000009}.tar``) rather than a directory."""
    return "{" in str(source) or str(source).endswith(".tar")


def list_shards(source: str | os.PathLike, split: str | None = None) -> list[str]:
    """Shard paths of a split: ``source`` is a directory with ``{split}-index.json`` or a brace pattern.

    A missing local shard raises ``ShardError``. Example pattern: ``/shards/train-{000000..000009}.tar``.
    """
    text = str(source)
    if is_pattern(text):
        urls = wds.shardlists.expand_urls(text)
    else:
        if split is None:
            raise ValueError(f"{text} is a directory: name the split whose index to read")
        urls = [str(Path(text) / name) for name in read_index(text, split).shards]
    for url in urls:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).is_file():
            raise ShardError("shard file is missing", shard=url)
    return urls
