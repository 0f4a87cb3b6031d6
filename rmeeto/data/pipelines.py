"""Streams that split shards over ranks and DataLoader workers, and a training loader that resumes mid-epoch.

Training (``TrainStream``) deals each epoch's shard permutation (the same on every rank) to ranks, then to
workers; each reader repeats its own shards, so within an epoch ranks never share a shard, and shuffles
each pass over them in a buffer that empties at the pass's end (``read_cycles``). Every rank stops after
exactly ``total // world_size // batch_size`` batches (``share`` gives each worker its part of them), so all
ranks run the same number of steps; a rank whose shards hold fewer samples than that repeats some.

Everything random in a reader's epoch derives from ``(seed, epoch, rank, worker slot)``, and a sample's
augmentation from that plus the sample's place in the reader's stream. So two runs with the same seed see
the same batches, and ``ResumableLoader`` can resume an epoch after ``k`` batches: each reader re-reads
(without transforming) the samples it had already produced and continues with the next one.

Evaluation (``eval_pipeline``) reads each sample exactly once over all ranks and workers, in file order,
and each sample's bytes are read by one reader only: shards are dealt to the readers when there are at least
as many shards as readers, else each shard is cut into contiguous sample ranges, one per reader
(``eval_parts``), and a reader seeks to its range's first sample (``rmeeto.data.reader.read_shard``).
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from rmeeto.data.reader import Check, ErrorPolicy, Sample, check_image, decode_image, read_shard, read_shards
from rmeeto.data.shards import ShardError


def rank_info() -> tuple[int, int]:
    """``(rank, world_size)`` as webdataset sees them (``RANK``/``WORLD_SIZE`` or torch.distributed)."""
    return tuple(wds.utils.pytorch_worker_info()[:2])


def worker_info() -> tuple[int, int]:
    """``(worker, num_workers)`` of the current DataLoader worker; (0, 1) in the main process."""
    return tuple(wds.utils.pytorch_worker_info()[2:])


def share(total: int, parts: int, part: int) -> int:
    """``part``'s share when ``total`` items are dealt round-robin to ``parts`` takers, starting with taker 0."""
    return total // parts + int(part < total % parts)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed python's, numpy's and torch's global generators (what timm and torchvision transforms draw from)
    for the block, then put their states back, so a seeded sample does not disturb anyone else's stream.

    Hand-rolled because a transform has to be replayable per sample (to resume without re-running the
    transforms of the skipped samples); Lightning's worker seeding only seeds each worker once.
    """
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def read_cycles(cycles: Iterable[list[dict[str, str]]], policy: ErrorPolicy, shuffle_buffer: int,
                rng: random.Random, expected: Mapping[str, int] | None = None, num_classes: int | None = None,
                check: Check = check_image) -> Iterator[Sample]:
    """Read each cycle's shards through a shuffle buffer (drawing from ``rng``) that empties before the next
    cycle starts, so a reader yields each of its samples once before it repeats any."""
    for shards in cycles:
        samples = policy.filter(read_shards(shards, expected, num_classes, check))
        empty = True
        for sample in wds.shuffle(shuffle_buffer, rng=rng)(samples) if shuffle_buffer > 1 else samples:
            empty = False
            yield sample
        if empty:  # all skipped: cycling on would never end
            raise ShardError(f"no readable sample in this reader's shards {[s['url'] for s in shards]}")


class TrainStream(IterableDataset):
    """Training samples ``(image 3×H×W or clip 3×T×H×W float, label)`` of one rank for one epoch.

    ``len()`` is ``batches_per_rank * batch_size``, and the stream yields exactly that many samples per pass
    over all workers, so a DataLoader with ``batch_size`` gives ``batches_per_rank`` full batches
    (``batches_per_rank = sum(counts) // world_size // batch_size``). ``epoch`` and ``skip`` (batches of this
    epoch the rank has already consumed) are set by ``ResumableLoader`` before each pass.
    """

    def __init__(self, urls: Sequence[str], counts: Sequence[int], *, batch_size: int,
                 transform: Callable[[Any], Tensor], policy: ErrorPolicy, rank: int, world_size: int,
                 shuffle_buffer: int = 5000, seed: int = 0, num_classes: int | None = None,
                 check: Check = check_image, decode: Callable[[Sample], Any] = decode_image) -> None:
        super().__init__()
        if not urls:
            raise ValueError("no shards to read")
        self.batches_per_rank = sum(counts) // world_size // batch_size
        if self.batches_per_rank == 0:
            raise ValueError(f"{sum(counts)} training samples do not fill one batch of {batch_size} "
                             f"on each of {world_size} ranks")
        self.urls, self.expected = list(urls), dict(zip(urls, counts, strict=True))
        self.batch_size, self.transform, self.policy = batch_size, transform, policy
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed, self.num_classes = shuffle_buffer, seed, num_classes
        self.check, self.decode = check, decode
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size

    def reader_shards(self, slot: int, num_slots: int) -> list[str]:
        """This reader's shards this epoch: the epoch's permutation dealt to ranks, then to worker slots.
        A reader left without one (fewer shards than readers) shares one of its rank's, or any."""
        order = list(self.urls)
        random.Random(wds.utils.make_seed(self.seed, self.epoch)).shuffle(order)
        rank_share = order[self.rank::self.world_size] or [order[self.rank % len(order)]]
        return rank_share[slot::num_slots] or [rank_share[slot % len(rank_share)]]

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:
        worker, num_workers = worker_info()
        # A DataLoader takes batches from its workers round-robin starting with worker 0, so after ``skip``
        # batches worker ``skip % num_workers`` was next: on a resumed pass, worker 0 plays that slot.
        slot = (worker + self.skip) % num_workers
        produced = share(self.skip, num_workers, slot) * self.batch_size
        wanted = share(self.batches_per_rank, num_workers, slot) * self.batch_size
        rng = random.Random(wds.utils.make_seed(self.seed, self.epoch, self.rank, slot))
        mine = self.reader_shards(slot, num_workers)

        def cycles() -> Iterator[list[dict[str, str]]]:
            for cycle in itertools.count():
                if cycle:
                    rng.shuffle(mine)
                yield [{"url": url} for url in mine]

        samples = read_cycles(cycles(), self.policy, self.shuffle_buffer, rng, self.expected, self.num_classes,
                              self.check)
        index = 0
        for sample in samples:
            if index == wanted:
                return
            if index < produced and self.policy.on_error == "raise":
                index += 1  # already produced before the resume: nothing to decode (decoding fails loudly)
                continue
            try:
                decoded = self.decode(sample)
            except ShardError as error:
                self.policy.handle(error)
                continue
            if index >= produced:
                with seeded(wds.utils.make_seed(self.seed, self.epoch, self.rank, slot, index)):
                    image = self.transform(decoded)
                yield image, sample["label"]
            index += 1


class ResumableLoader(DataLoader):
    """DataLoader over a ``TrainStream`` (or any dataset with ``epoch`` and ``skip``, the batches of the
    epoch to leave out, such as :class:`rmeeto.data.folder_dm.ResumableItems`) that can stop mid-epoch and
    resume where it stopped.

    It follows Lightning's loader contract (``state_dict``/``load_state_dict``, saved in checkpoints):
    the state is the epoch and the batches of it yielded so far. Lightning does not prefetch from a loader
    with a length, so at a checkpoint those are the batches trained on. After ``load_state_dict`` the next
    pass continues that epoch (or starts the next one if it was complete); each other pass starts a new epoch.
    Workers are not persistent: each pass sends them the stream with its epoch and resume point.
    """

    def __init__(self, dataset: TrainStream | Any, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.epoch, self.batches = -1, 0
        self._resume: tuple[int, int] | None = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        try:
            epoch, batches = int(state["epoch"]), int(state["batches"])
        except (KeyError, TypeError, ValueError) as exn:
            raise ValueError(f"training loader state {dict(state)!r} lacks an int 'epoch' and 'batches'") from exn
        if not 0 <= batches <= len(self):
            raise ValueError(f"training loader state has {batches} batches done, an epoch has {len(self)}: "
                             "the checkpoint was written with another dataset, batch size or world size")
        self._resume = (epoch, batches)

    def __iter__(self) -> Iterator[Any]:
        if self._resume is None:
            epoch, done = self.epoch + 1, 0
        else:
            (epoch, done), self._resume = self._resume, None
            if done == len(self):
                epoch, done = epoch + 1, 0
        self.epoch, self.batches = epoch, done
        self.dataset.epoch, self.dataset.skip = epoch, done
        for batch in super().__iter__():
            self.batches += 1
            yield batch


def train_pipeline(urls: Sequence[str], counts: Sequence[int], **kwargs: Any) -> TrainStream:
    """A ``TrainStream`` (keyword arguments as there) of this process's rank."""
    rank, world_size = rank_info()
    return TrainStream(urls, counts, rank=rank, world_size=world_size, **kwargs)


def eval_parts(counts: Sequence[int], readers: int) -> list[list[tuple[int, int, int]]]:
    """For each of ``readers`` readers, its ``(shard, start, stop)`` sample ranges; over all readers they
    cover every sample once and no two readers touch the same shard bytes.

    With at least as many shards as readers, whole shards are dealt round-robin. With fewer, reader ``r``
    reads shard ``r % len(counts)``, cut into contiguous ranges among the readers of that shard.
    """
    if len(counts) >= readers:
        return [[(s, 0, counts[s]) for s in range(r, len(counts), readers)] for r in range(readers)]
    parts = []
    for r in range(readers):
        shard, piece = r % len(counts), r // len(counts)
        pieces, n = share(readers, len(counts), shard), counts[shard]
        parts.append([(shard, n * piece // pieces, n * (piece + 1) // pieces)])
    return parts


class EvalStream(IterableDataset):
    """This reader's evaluation samples ``(image or clip, label)`` in file order (see ``eval_parts``)."""

    def __init__(self, urls: Sequence[str], counts: Sequence[int], *, transform: Callable[[Any], Tensor],
                 policy: ErrorPolicy, rank: int, world_size: int, num_classes: int | None = None,
                 check: Check = check_image, decode: Callable[[Sample], Any] = decode_image) -> None:
        super().__init__()
        self.urls, self.counts = list(urls), list(counts)
        self.transform, self.policy = transform, policy
        self.rank, self.world_size, self.num_classes = rank, world_size, num_classes
        self.check, self.decode = check, decode

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:
        worker, num_workers = worker_info()
        parts = eval_parts(self.counts, self.world_size * num_workers)[self.rank * num_workers + worker]
        for shard, start, stop in parts:
            if start == stop:
                continue
            items = read_shard(self.urls[shard], self.counts[shard], self.num_classes, self.check, start, stop)
            for sample in self.policy.filter(items):
                try:
                    decoded = self.decode(sample)
                except ShardError as error:
                    self.policy.handle(error)
                    continue
                yield self.transform(decoded), sample["label"]


def eval_pipeline(urls: Sequence[str], counts: Sequence[int], **kwargs: Any) -> EvalStream:
    """An ``EvalStream`` (keyword arguments as there) of this process's rank: over all ranks and their
    DataLoader workers, every sample comes out exactly once."""
    rank, world_size = rank_info()
    return EvalStream(urls, counts, rank=rank, world_size=world_size, **kwargs)

