"""LightningDataModule streaming ImageNet-style webdataset shards (see ``rmeeto.data.pipelines``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from rmeeto.data.base import Triple, VisionDataModule
from rmeeto.data.pipelines import ResumableLoader, eval_pipeline, train_pipeline
from rmeeto.data.reader import Check, ErrorPolicy, OnError, Sample, check_image, decode_image
from rmeeto.data.shards import ShardIndex, index_path, list_shards, read_index
from rmeeto.data.transforms import Augment


class WebDatasetDataModule(VisionDataModule):
    """Train/val loaders over ``root/{split}-NNNNNN.tar`` shards described by ``root/{split}-index.json``.

    Batches are ``(images (B, 3, img_size, img_size) float32, labels (B,) int64)``.

    Training reads a *repeated* stream, not a resampled one: each epoch deals a shard permutation (the
    same on every rank, drawn from ``seed``) to ranks and then workers, and each reader repeats its own
    shards through a sample shuffle buffer until it has its share of the epoch: every rank yields exactly
    ``train_num_samples // world_size // batch_size`` full batches per epoch (also the loader's ``len()``),
    and ranks read disjoint shards within an epoch. Shuffling and augmentation derive from ``seed``
    (default: the run's ``seed_everything`` seed), so runs repeat, and the training loader is a
    ``ResumableLoader``: a run resumed from a mid-epoch checkpoint continues the epoch's stream.

    Validation/test do not shuffle and see every sample of ``val_split`` exactly once over all ranks and
    workers (per-rank counts may differ), each sample read by one reader (see ``eval_parts``).
    ``val_num_samples`` is what the ranks' counts add up to (minus ``val_skipped_samples``).

    Ranks come from torch.distributed (or ``RANK``/``WORLD_SIZE``), as webdataset reads them.
    ``num_classes`` defaults to the train index's (the val index's when there is no train split, for
    evaluation only); ``mean``/``std`` to that index's when it has them, else to ImageNet's (timm's).
    ``augment``: the training augmentation (``rmeeto.data.Augment``).
    ``on_error="skip"`` warns about and skips unreadable shards/samples and counts them in
    ``skipped_samples``; ``"raise"`` raises ``ShardError``.

    A subclass for other samples (clips: ``rmeeto.data.video.VideoDataModule``) sets ``check``/``decode``
    and overrides :meth:`transform`.
    """

    check: Check = staticmethod(check_image)
    decode: Callable[[Sample], Any] = staticmethod(decode_image)

    def __init__(
        self,
        root: str,
        train_split: str = "train",
        val_split: str = "val",
        img_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 8,
        shuffle_buffer: int = 5000,
        augment: Augment = Augment(),
        mean: Triple | None = None,
        std: Triple | None = None,
        on_error: OnError = "raise",
        num_classes: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(img_size, batch_size, num_workers, augment, mean, std)
        self.save_settings()
        self.root = Path(root)
        self.train_split, self.val_split = train_split, val_split
        self.shuffle_buffer = shuffle_buffer
        self._num_classes = num_classes
        self._seed = seed
        self.on_error = on_error
        self._train_loader: ResumableLoader | None = None
        self._loader_state: dict[str, int] | None = None

    @cached_property
    def train_policy(self) -> ErrorPolicy:
        """Made on first use, so that it belongs to the process (e.g. a ``ddp_spawn`` rank) that uses it."""
        return ErrorPolicy(self.on_error)

    @cached_property
    def val_policy(self) -> ErrorPolicy:
        """Like ``train_policy``; separate so that validation's skips can be told apart."""
        return ErrorPolicy(self.on_error)

    @cached_property
    def train_index(self) -> ShardIndex:
        return read_index(self.root, self.train_split)

    @cached_property
    def val_index(self) -> ShardIndex:
        return read_index(self.root, self.val_split)

    @cached_property
    def reference_index(self) -> ShardIndex:
        """Where classes and mean/std come from: the train index, or the val index for evaluation-only data."""
        return self.train_index if index_path(self.root, self.train_split).is_file() else self.val_index

    @property
    def num_classes(self) -> int:
        return self._num_classes or self.reference_index.num_classes

    @property
    def classes(self) -> list[str] | None:
        return self.reference_index.classes

    @property
    def default_mean(self) -> Triple:
        return self.reference_index.mean or super().default_mean

    @property
    def default_std(self) -> Triple:
        return self.reference_index.std or super().default_std

    @property
    def seed(self) -> int:
        """The ``seed`` setting, else the seed of ``lightning.seed_everything`` (``PL_GLOBAL_SEED``), else 0."""
        return self._seed if self._seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    @property
    def train_num_samples(self) -> int:
        return self.train_index.num_samples

    @property
    def val_num_samples(self) -> int:
        """Samples in the validation split; summed over ranks, validation sees exactly these."""
        return self.val_index.num_samples

    @property
    def skipped_samples(self) -> int:
        """Samples skipped so far under ``on_error="skip"``, training and validation, by this rank's workers."""
        return self.train_policy.skipped + self.val_policy.skipped

    @property
    def val_skipped_samples(self) -> int:
        """Validation/test samples skipped so far by this rank's workers (cumulative over passes): a pass's
        increase, summed over ranks, plus the samples seen equals ``val_num_samples``."""
        return self.val_policy.skipped

    def setup(self, stage: str | None = None) -> None:
        """Check that the indexes agree with ``num_classes`` and that every shard file is there."""
        indexes = [self.val_index] if stage in ("validate", "test") else [self.train_index, self.val_index]
        for index in indexes:
            if index.num_classes > self.num_classes:
                raise ValueError(f"{index.split} index has {index.num_classes} classes, "
                                 f"num_classes={self.num_classes}")
            list_shards(self.root, index.split)

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position, also kept here because Lightning drops the loader's own state on
        resume when ``configure_optimizers`` asks for ``trainer.estimated_stepping_batches`` (Lightning
        issue #20550): the DataModule's state is restored before that call creates the loader."""
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loader_state = state.get("train_loader")

    def train_dataloader(self) -> ResumableLoader:
        dataset = train_pipeline(
            list_shards(self.root, self.train_split), list(self.train_index.shards.values()),
            batch_size=self.batch_size, transform=self.transform(True), policy=self.train_policy,
            shuffle_buffer=self.shuffle_buffer, seed=self.seed, num_classes=self.num_classes, check=self.check,
            decode=self.decode,
        )
        self._train_loader = ResumableLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                             pin_memory=torch.cuda.is_available())
        if self._loader_state is not None:
            self._train_loader.load_state_dict(self._loader_state)
            self._loader_state = None
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        dataset = eval_pipeline(
            list_shards(self.root, self.val_split), list(self.val_index.shards.values()),
            transform=self.transform(False), policy=self.val_policy, num_classes=self.num_classes,
            check=self.check, decode=self.decode,
        )
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available())
