"""Reading shards as checked samples: every failure becomes a ``ShardError`` naming the shard and the key.

``read_shards`` parses tars with webdataset's tar iterators and yields either a sample
``{"key", "shard", "jpg", "label"}`` or a ``ShardError`` item in its place (a missing or truncated shard,
a sample without ``.cls`` or image, a bad label), so a stage further down decides with an ``ErrorPolicy``
whether to raise or to skip.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, Literal

import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from rmeeto.data.shards import ShardError, is_pattern, list_shards, read_index

OnError = Literal["raise", "skip"]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")

Sample = dict[str, Any]
#: raw webdataset sample, shard url, num_classes → checked Sample or the ShardError it has
Check = Callable[[Mapping[str, Any], str, int | None], "Sample | ShardError"]


class ErrorPolicy:
    """Raise a ``ShardError`` (``"raise"``) or warn and count the samples it lost (``"skip"``).

    The counter lives in shared memory, so skips in DataLoader worker processes show up in ``skipped``.
    """

    def __init__(self, on_error: OnError = "raise") -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.on_error = on_error
        self._skipped = multiprocessing.Value("q", 0)

    @property
    def skipped(self) -> int:
        """Samples skipped so far, over all processes that share this policy."""
        return int(self._skipped.value)

    def handle(self, error: ShardError) -> None:
        if self.on_error == "raise":
            raise error
        warnings.warn(f"skipping: {error}", stacklevel=2)
        with self._skipped.get_lock():
            self._skipped.value += error.lost

    def filter(self, items: Iterable[Sample | ShardError]) -> Iterator[Sample]:
        """Pipeline stage: pass samples through, hand ``ShardError`` items to ``handle``."""
        for item in items:
            if isinstance(item, ShardError):
                self.handle(item)
            else:
                yield item


def check_image(raw: Mapping[str, Any], shard: str, num_classes: int | None) -> Sample | ShardError:
    """Turn a raw webdataset sample into ``{"key", "shard", "jpg", "label"}`` or the error it has."""
    key = raw["__key__"]
    image = next((raw[ext] for ext in IMAGE_EXTENSIONS if ext in raw), None)
    if image is None:
        return ShardError(f"sample has no image file (.{'/.'.join(IMAGE_EXTENSIONS)})", shard, key)
    label = check_label(raw, shard, num_classes)
    if isinstance(label, ShardError):
        return label
    return {"key": key, "shard": shard, "jpg": image, "label": label}


def check_label(raw: Mapping[str, Any], shard: str, num_classes: int | None) -> int | ShardError:
    """The sample's ``.cls`` label, or the ShardError of a missing, unparsable or out-of-range one."""
    key = raw["__key__"]
    if "cls" not in raw:
        return ShardError("sample has no .cls label", shard, key)
    try:
        label = int(raw["cls"])
    except ValueError:
        return ShardError(f"bad .cls label {raw['cls'][:20]!r}", shard, key)
    if label < 0 or (num_classes is not None and label >= num_classes):
        return ShardError(f"label {label} out of range for num_classes={num_classes}", shard, key)
    return label


def sample_offset(path: str, index: int) -> int:
    """Byte offset of the tar header that starts the ``index``-th sample of a local shard (a sample is a run
    of members sharing a key). ``tarfile`` reads only the headers here: it seeks past each member's data."""
    with tarfile.open(path) as tar:
        number, last_key = -1, None
        for member in tar:
            key = base_plus_ext(member.name)[0]
            if key != last_key:
                number, last_key = number + 1, key
            if number == index:
                return member.offset
    raise ValueError(f"the shard has {number + 1} samples, not more than {index}")


def open_at(url: str, start: int) -> tuple[IO[bytes], int]:
    """``url`` opened at its ``start``-th sample where it is a local file (then returns ``(stream, start)``),
    else at its beginning (``(stream, 0)``: the caller skips ``start`` samples)."""
    if start == 0 or "://" in url or url.startswith("pipe:") or not os.path.isfile(url):
        return wds.gopen(url, "rb"), 0
    offset = sample_offset(url, start)
    stream = open(url, "rb")  # noqa: SIM115 (closed by the caller's with-block)
    stream.seek(offset)
    return stream, start


def read_shard(url: str, expected: int | None = None, num_classes: int | None = None, check: Check = check_image,
               start: int = 0, stop: int | None = None) -> Iterator[Sample | ShardError]:
    """Samples ``start..stop-1`` (default: all) of one shard in file order, each through ``check`` (images by
    default; clips: ``rmeeto.data.video.check_clip``); a read failure or a count differing from ``expected``
    (the shard's count in the index) ends it with one ``ShardError`` item (``lost`` = samples of the range
    missing against ``expected``, at least 1). A local shard is read from ``start``'s byte offset on."""
    stop = expected if stop is None else stop
    wanted = None if stop is None else stop - start
    seen, last_key = 0, None
    try:
        stream, position = open_at(url, start)
        with stream:
            files = tar_file_expander([{"url": url, "stream": stream}])
            for raw in group_by_keys(files):
                position += 1
                if position <= start:
                    continue
                if stop is not None and position > stop and stop != expected:
                    return  # the rest of the shard is another reader's range
                last_key = raw["__key__"]
                seen += 1
                yield check(raw, url, num_classes)
    except Exception as exn:  # tarfile, gopen and webdataset raise many types; all mean an unreadable shard
        where = f"after sample {last_key!r}" if last_key is not None else f"before sample {start}"
        detail = str(exn.args[0]).split(" @ ")[0] if exn.args else ""  # webdataset appends " @ <stream>"
        lost = max(1, wanted - seen) if wanted is not None else 1
        yield ShardError(f"corrupt, truncated or missing shard ({where}): {type(exn).__name__}: {detail}",
                         url, lost=lost)
        return
    if wanted is not None and seen != wanted:
        yield ShardError(f"shard has {start + seen} samples, the index says {expected}", url,
                         key=last_key, lost=max(1, wanted - seen))


def read_shards(shards: Iterable[Mapping[str, str]], expected: Mapping[str, int] | None = None,
                num_classes: int | None = None, check: Check = check_image) -> Iterator[Sample | ShardError]:
    """Pipeline stage: ``read_shard`` over a stream of ``{"url": path}`` (``expected`` maps path → count)."""
    for shard in shards:
        url = shard["url"]
        yield from read_shard(url, None if expected is None else expected.get(url), num_classes, check)


def decode_image(sample: Sample) -> Image.Image:
    """Decode the sample's image bytes to an RGB PIL image; undecodable bytes raise ``ShardError``."""
    try:
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            return image.convert("RGB")
    except Exception as exn:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError, ...
        raise ShardError(f"undecodable image: {exn!r}", sample["shard"], sample["key"]) from exn


@dataclass
class SplitReport:
    """Outcome of ``validate_split``: good samples and samples skipped (``on_error="skip"``)."""

    num_samples: int
    num_skipped: int


def validate_split(source: str | os.PathLike, split: str | None = None, on_error: OnError = "raise"
                   ) -> SplitReport:
    """Read and decode every sample of a split (index directory or brace pattern) and check the counts."""
    urls = list_shards(source, split)
    expected = num_classes = None
    if split is not None and not is_pattern(source):
        index = read_index(source, split)
        expected = dict(zip(urls, index.shards.values(), strict=True))
        num_classes = index.num_classes
    policy = ErrorPolicy(on_error)
    good = 0
    for sample in policy.filter(read_shards([{"url": u} for u in urls], expected, num_classes)):
        try:
            decode_image(sample)
        except ShardError as error:
            policy.handle(error)
        else:
            good += 1
    return SplitReport(good, policy.skipped)
