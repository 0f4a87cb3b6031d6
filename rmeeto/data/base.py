"""What every DataModule of the project shares: image size, batch size, workers, augmentation and normalisation."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning as L
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import DataLoader

from rmeeto.data.transforms import Augment, eval_transform, train_transform

Triple = tuple[float, float, float]


class VisionDataModule(L.LightningDataModule):
    """Base of the project's DataModules; batches are ``(inputs (B, 3, …, img_size, img_size), labels (B,))``.

    ``mean``/``std`` (3 floats each) normalise the train and eval inputs; unset, they are the subclass's
    ``default_mean``/``default_std`` (ImageNet's, timm's constants, unless the data records its own).
    ``augment`` is the training augmentation. ``test`` reads what ``validate`` reads.
    """

    def __init__(self, img_size: int, batch_size: int, num_workers: int, augment: Augment,
                 mean: Triple | None, std: Triple | None) -> None:
        super().__init__()
        self.img_size, self.batch_size, self.num_workers = img_size, batch_size, num_workers
        self.augment = augment
        self._mean, self._std = mean, std

    def save_settings(self) -> None:
        """``save_hyperparameters`` of the calling ``__init__``, with ``augment`` as a plain dict: checkpoints
        hold the hyperparameters and Lightning loads them with ``weights_only=True``, which refuses classes."""
        self.save_hyperparameters(ignore=["augment"], frame=inspect.currentframe().f_back)
        self.hparams["augment"] = asdict(self.augment)

    @property
    def default_mean(self) -> Triple:
        return IMAGENET_DEFAULT_MEAN

    @property
    def default_std(self) -> Triple:
        return IMAGENET_DEFAULT_STD

    @property
    def mean(self) -> Triple:
        return tuple(float(v) for v in (self._mean or self.default_mean))

    @property
    def std(self) -> Triple:
        return tuple(float(v) for v in (self._std or self.default_std))

    def transform(self, train: bool) -> Callable[[Any], Tensor]:
        """The per-sample transform of the train or eval loader (subclasses: other kinds of samples)."""
        if train:
            return train_transform(self.img_size, self.augment, self.mean, self.std)
        return eval_transform(self.img_size, self.mean, self.std)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
