"""Data: webdataset shards (writing, indexes, checked reading), timm transforms, Lightning DataModules."""

from rmeeto.data.base import VisionDataModule
from rmeeto.data.demo import ensure_demo_shards, write_demo_shards
from rmeeto.data.folder_dm import ImageFolderDataModule
from rmeeto.data.reader import ErrorPolicy, SplitReport, validate_split
from rmeeto.data.shards import ShardError, ShardIndex, list_shards, read_index, write_shards
from rmeeto.data.transforms import Augment, eval_transform, mixup_fn, train_transform
from rmeeto.data.webdataset_dm import WebDatasetDataModule

__all__ = [
    "Augment",
    "ErrorPolicy",
    "ImageFolderDataModule",
    "ShardError",
    "ShardIndex",
    "SplitReport",
    "VisionDataModule",
    "WebDatasetDataModule",
    "ensure_demo_shards",
    "eval_transform",
    "list_shards",
    "mixup_fn",
    "read_index",
    "train_transform",
    "validate_split",
    "write_demo_shards",
    "write_shards",
]
