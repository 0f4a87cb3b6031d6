"""LightningDataModule over a torchvision ImageFolder tree ``root/train/<class>/*``, ``root/val/<class>/*``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from rmeeto.data.base import Triple, VisionDataModule
from rmeeto.data.pipelines import ResumableLoader, rank_info, seeded
from rmeeto.data.transforms import Augment, ImageTransform


def class_folders(folder: Path) -> list[str]:
    """Sorted class folder names of ``folder``; a missing folder or one without class folders is an error."""
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageFolder split {folder} does not exist (expected {folder}/<class>/<image>)")
    try:
        return find_classes(str(folder))[0]
    except FileNotFoundError as exn:
        raise FileNotFoundError(f"ImageFolder split {folder} has no class folders "
                                f"(expected {folder}/<class>/<image>)") from exn


def image_folder(folder: Path, transform: ImageTransform) -> ImageFolder:
    """torchvision's ImageFolder over ``folder``, with the project's error for a missing or empty tree."""
    class_folders(folder)
    try:
        return ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as exn:  # torchvision: "Found no valid file for the classes ..."
        raise FileNotFoundError(f"ImageFolder split {folder} has class folders but no images "
                                f"({', '.join(IMG_EXTENSIONS)})") from exn


class ResumableItems(Dataset):
    """A map-style dataset whose item i of ``epoch`` is read under generators seeded from (seed, epoch, i), so
    runs repeat and a resumed epoch augments each sample as the uninterrupted one did. ``epoch`` and ``skip``
    (batches of the epoch already trained on) are set by :class:`~rmeeto.data.pipelines.ResumableLoader`."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed
        self.epoch, self.skip = 0, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with seeded(wds.utils.make_seed(self.seed, self.epoch, index)):
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """This rank's shuffled share of a :class:`ResumableItems` epoch (permutation from seed and epoch, as
    torch's DistributedSampler draws it), without its first ``skip`` batches. Being a DistributedSampler,
    Lightning leaves it in place under DDP."""

    dataset: ResumableItems

    def __init__(self, dataset: ResumableItems, batch_size: int) -> None:
        rank, world_size = rank_info()
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=dataset.seed, drop_last=True)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[int]:
        self.epoch = self.dataset.epoch
        indices = list(super().__iter__())
        return iter(indices[self.dataset.skip * self.batch_size:])


class ImageFolderDataModule(VisionDataModule):
    """Same transforms and batches as ``WebDatasetDataModule`` (``(B, 3, img_size, img_size)`` float32,
    ``(B,)`` int64), read from class folders; labels are sorted-class-name indices.

    Training shuffles (each rank its share, from ``seed``: default the run's ``seed_everything`` seed) and
    drops the last partial batch; its loader resumes mid-epoch where it stopped (Lightning's loader
    ``state_dict``), with each sample augmented as in an uninterrupted run. Validation keeps every sample
    exactly once over ranks: when torch.distributed is initialized it uses Lightning's
    ``UnrepeatedDistributedSampler`` (no padding), which Lightning leaves in place. ``mean``/``std`` default
    to ImageNet's (timm's).

    A tree with only ``val_dir`` serves evaluation (``validate``/``test``): classes then come from it. A
    missing or empty folder raises ``FileNotFoundError`` naming it.
    """

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str = "val",
        img_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 8,
        augment: Augment = Augment(),
        mean: Triple | None = None,
        std: Triple | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__(img_size, batch_size, num_workers, augment, mean, std)
        self.save_settings()
        self.root = Path(root)
        self.train_dir, self.val_dir = train_dir, val_dir
        self._seed = seed
        self._train_loader: ResumableLoader | None = None
        self._loader_state: dict[str, int] | None = None

    @cached_property
    def train_set(self) -> ImageFolder:
        return image_folder(self.root / self.train_dir, self.transform(True))

    @cached_property
    def val_set(self) -> ImageFolder:
        val_set = image_folder(self.root / self.val_dir, self.transform(False))
        if val_set.classes != self.classes:
            raise ValueError(f"{self.root / self.val_dir} has classes {val_set.classes[:5]}..., "
                             f"{self.root / self.train_dir} has {self.classes[:5]}...")
        return val_set

    @cached_property
    def classes(self) -> list[str]:
        """Sorted class folder names of the train split, or of the val split in a val-only tree (found
        without listing the images)."""
        folder = self.root / self.train_dir
        if not folder.is_dir():
            folder = self.root / self.val_dir
        return class_folders(folder)

    def setup(self, stage: str | None = None) -> None:
        """Check that the folders the stage reads exist and hold images."""
        if stage in ("validate", "test"):
            _ = self.val_set
        else:
            _ = self.train_set, self.val_set

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def val_num_samples(self) -> int:
        """Samples in the validation folder; summed over ranks, validation sees exactly these."""
        return len(self.val_set)

    @property
    def seed(self) -> int:
        """The ``seed`` setting, else the seed of ``lightning.seed_everything`` (``PL_GLOBAL_SEED``), else 0."""
        return self._seed if self._seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (kept here too, as WebDatasetDataModule does: Lightning issue #20550)."""
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loader_state = state.get("train_loader")

    def train_dataloader(self) -> ResumableLoader:
        items = ResumableItems(self.train_set, self.seed)
        # workers are not persistent: each pass sends them the dataset with its epoch
        self._train_loader = ResumableLoader(items, batch_size=self.batch_size, drop_last=True,
                                             sampler=ResumableSampler(items, self.batch_size),
                                             num_workers=self.num_workers, pin_memory=torch.cuda.is_available())
        if self._loader_state is not None:
            self._train_loader.load_state_dict(self._loader_state)
            self._loader_state = None
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        rank, world_size = rank_info()
        sampler = (UnrepeatedDistributedSampler(self.val_set, num_replicas=world_size, rank=rank, shuffle=False)
                   if world_size > 1 else None)
        return DataLoader(self.val_set, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())
