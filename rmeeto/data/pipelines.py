"""webdataset pipelines that split shards over ranks and DataLoader workers.

Training deals each epoch's shard permutation (the same on every rank) to ranks, then to workers; each
reader repeats its own shards endlessly (``EpochShards``), so within an epoch ranks never share a shard,
and shuffles each pass over them in a buffer that empties at the pass's end (``read_cycles``).
Every rank stops after exactly ``total // world_size // batch_size`` batches (``worker_share`` gives each
worker its part of them), so all ranks run the same number of steps and no epoch ends early on a short
shard; a rank whose shards hold fewer samples than that repeats some of its own.

Evaluation reads each sample exactly once over all ranks and workers, in file order, without shuffling:
shards are dealt to ranks then workers when there are at least ``world_size * num_workers`` of them;
with fewer, every reader reads all shards and keeps every ``world_size * num_workers``-th sample
(exact-once still holds; the bytes are read by each reader, only its own samples are decoded).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch.distributed as dist
import webdataset as wds
from torch import Tensor
from torch.utils.data import IterableDataset

from rmeeto.data.reader import Check, ErrorPolicy, Sample, check_image, decode_image, read_shards
from rmeeto.data.shards import ShardError


def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` from torch.distributed when initialized (as ``wds.split_by_node``), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def worker_info() -> tuple[int, int]:
    """``(worker, num_workers)`` of the current DataLoader worker; (0, 1) in the main process."""
    return wds.utils.pytorch_worker_info()[2:]


class EpochShards(IterableDataset):
    """This reader's shards for the epoch, as one list of ``{"url": shard}`` per cycle, endlessly.

    Each epoch draws a permutation of all shards from ``(seed, epoch)``, the same on every rank, and deals
    it to ranks and then to workers (``wds.split_by_worker``), so readers own disjoint shards; a reader
    cycles over its own shards (reshuffled each cycle), never into another's. A reader left without a shard
    (fewer shards than ranks x workers) shares one of its rank's, or with fewer shards than ranks, any.
    ``epoch`` counts calls to ``__iter__`` in this process, which keeps ranks in step as long as the
    object lives on (main process or persistent DataLoader workers).
    """

    def __init__(self, urls: Sequence[str], rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        super().__init__()
        if not urls:
            raise ValueError("no shards to read")
        self.urls = list(urls)
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.epoch = -1

    def __iter__(self) -> Iterator[list[dict[str, str]]]:
        self.epoch += 1
        order = list(self.urls)
        random.Random(wds.utils.make_seed(self.seed, self.epoch)).shuffle(order)
        rank_share = order[self.rank::self.world_size] or [order[self.rank % len(order)]]
        worker, _ = worker_info()
        mine = list(wds.split_by_worker(rank_share)) or [rank_share[worker % len(rank_share)]]
        rng = random.Random(wds.utils.make_seed(self.seed, self.epoch, self.rank, worker))
        for cycle in itertools.count():
            if cycle:
                rng.shuffle(mine)
            yield [{"url": url} for url in mine]


def read_cycles(cycles: Iterable[list[dict[str, str]]], policy: ErrorPolicy, shuffle_buffer: int,
                expected: Mapping[str, int] | None = None, num_classes: int | None = None,
                check: Check = check_image) -> Iterator[Sample]:
    """Read each cycle's shards through a shuffle buffer that empties before the next cycle starts, so a
    reader yields each of its samples once before it repeats any."""
    for shards in cycles:
        samples = policy.filter(read_shards(shards, expected, num_classes, check))
        empty = True
        for sample in wds.shuffle(shuffle_buffer)(samples) if shuffle_buffer > 1 else samples:
            empty = False
            yield sample
        if empty:  # all skipped: cycling on would never end
            raise ShardError(f"no readable sample in this reader's shards {[s['url'] for s in shards]}")


def split_by_rank(src: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    """Every ``world_size``-th item starting at ``rank`` (``wds.split_by_node`` with explicit rank/world)."""
    return itertools.islice(src, rank, None, world_size)


def split_by_reader(src: Iterable[Any], rank: int, world_size: int) -> Iterator[Any]:
    """Every ``world_size * num_workers``-th item, starting at this worker's global reader slot."""
    worker, num_workers = worker_info()
    return itertools.islice(src, rank * num_workers + worker, None, world_size * num_workers)


def worker_share(src: Iterable[Any], batches_per_rank: int, batch_size: int) -> Iterator[Any]:
    """This worker's part of the rank's ``batches_per_rank`` full batches, as ``batch_size``-sample groups."""
    worker, num_workers = worker_info()
    batches = batches_per_rank // num_workers + int(worker < batches_per_rank % num_workers)
    return itertools.islice(src, batches * batch_size)


def to_tensors(src: Iterable[Sample], transform: Callable[[Any], Tensor], policy: ErrorPolicy,
               decode: Callable[[Sample], Any] = decode_image) -> Iterator[tuple[Tensor, int]]:
    """Decode and transform: sample → (image 3×H×W or clip 3×T×H×W float, label); what ``decode`` (images
    by default; clips: ``rmeeto.data.video.decode_clip``) cannot read goes to ``policy``."""
    for sample in src:
        try:
            decoded = decode(sample)
        except ShardError as error:
            policy.handle(error)
            continue
        yield transform(decoded), sample["label"]


class SizedPipeline(wds.DataPipeline):
    """``wds.DataPipeline`` with ``len()``; unlike ``.with_length()``, whose on-the-fly class cannot be pickled,
    it works with spawn/forkserver DataLoader workers."""

    def __init__(self, *stages: Any, size: int) -> None:
        super().__init__(*stages)
        self.size = size

    def __len__(self) -> int:
        return self.size


def train_pipeline(
    urls: Sequence[str],
    counts: Sequence[int],
    *,
    batch_size: int,
    transform: Callable[[Any], Tensor],
    policy: ErrorPolicy,
    rank: int = 0,
    world_size: int = 1,
    shuffle_buffer: int = 5000,
    seed: int = 0,
    num_classes: int | None = None,
    check: Check = check_image,
    decode: Callable[[Sample], Any] = decode_image,
) -> wds.DataPipeline:
    """Training samples (images, or clips with the video ``check``/``decode``) for one rank; ``len()`` is
    ``batches_per_rank * batch_size`` and the stream yields exactly that many samples per epoch, so a
    DataLoader with ``batch_size`` gives ``batches_per_rank`` full batches
    (``batches_per_rank = sum(counts) // world_size // batch_size``)."""
    batches_per_rank = sum(counts) // world_size // batch_size
    if batches_per_rank == 0:
        raise ValueError(f"{sum(counts)} training samples do not fill one batch of {batch_size} "
                         f"on each of {world_size} ranks")
    expected = dict(zip(urls, counts, strict=True))
    return SizedPipeline(
        EpochShards(urls, rank, world_size, seed),
        partial(read_cycles, policy=policy, shuffle_buffer=shuffle_buffer, expected=expected,
                num_classes=num_classes, check=check),
        partial(to_tensors, transform=transform, policy=policy, decode=decode),
        partial(worker_share, batches_per_rank=batches_per_rank, batch_size=batch_size),
        size=batches_per_rank * batch_size,
    )


def eval_pipeline(
    urls: Sequence[str],
    counts: Sequence[int],
    *,
    transform: Callable[[Any], Tensor],
    policy: ErrorPolicy,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    num_classes: int | None = None,
    check: Check = check_image,
    decode: Callable[[Sample], Any] = decode_image,
) -> wds.DataPipeline:
    """Evaluation samples ``(image or clip, label)`` of one rank, in file order; over all ranks and the
    ``num_workers`` DataLoader workers of each, every sample comes out exactly once."""
    read = partial(read_shards, expected=dict(zip(urls, counts, strict=True)), num_classes=num_classes,
                   check=check)
    if len(urls) >= world_size * max(1, num_workers):
        split = [partial(split_by_rank, rank=rank, world_size=world_size), wds.split_by_worker, read]
    else:
        split = [read, partial(split_by_reader, rank=rank, world_size=world_size)]
    return wds.DataPipeline(
        wds.SimpleShardList(list(urls)),
        *split,
        policy.filter,
        partial(to_tensors, transform=transform, policy=policy, decode=decode),
    )
