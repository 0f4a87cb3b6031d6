"""Tests for rmeeto.data: shard format, demo set, webdataset/ImageFolder DataModules, make_shards.py."""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import tarfile
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from conftest import load_script
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from torchvision import transforms as T

from rmeeto.data import (
    Augment,
    ErrorPolicy,
    ImageFolderDataModule,
    ShardError,
    WebDatasetDataModule,
    ensure_demo_shards,
    eval_transform,
    list_shards,
    mixup_fn,
    pipelines,
    read_index,
    reader,
    validate_split,
    write_shards,
)
from rmeeto.data.reader import read_shards
from rmeeto.data.shards import ShardIndex, write_index
from rmeeto.data.transforms import train_transform

REPO = Path(__file__).resolve().parents[1]


def jpeg(seed: int, size: int = 16) -> bytes:
    """A random-noise RGB JPEG (noise keeps the file big enough to truncate mid-image)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def make_split(root: Path, split: str, shards: int, per_shard: int, num_classes: int = 3) -> list[str]:
    """Write ``shards`` x ``per_shard`` samples keyed ``s{shard}_{i}``; return the keys."""
    keys = [f"s{s}_{i}" for s in range(shards) for i in range(per_shard)]
    samples = ({"__key__": key, "jpg": jpeg(n), "cls": n % num_classes} for n, key in enumerate(keys))
    write_shards(samples, root, split, max_per_shard=per_shard, num_classes=num_classes)
    return keys


def rewrite_shard(path: Path, samples: list[dict]) -> None:
    """Replace a shard with hand-made (possibly malformed) samples."""
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)


def truncate_in_sample(path: Path, member: int) -> None:
    """Cut a shard in the middle of the data of its ``member``-th file."""
    with tarfile.open(path) as tar:
        info = tar.getmembers()[member]
    with open(path, "r+b") as handle:
        handle.truncate(info.offset_data + info.size // 2)


def read_all(root: Path, split: str) -> list[dict]:
    return list(read_shards({"url": url} for url in list_shards(root, split)))


def key_and_shard(sample: dict) -> tuple[str, str]:
    """Stand-in decoder that reports which sample came out, without decoding."""
    return sample["key"], sample["shard"]


def identity(x: object) -> object:
    return x


def labels_of(loader: torch.utils.data.DataLoader) -> list[int]:
    return [int(y) for _, labels in loader for y in labels]


# --- shard format ----------------------------------------------------------------------------------


def test_write_shards_round_trip(tmp_path: Path) -> None:
    samples = [{"__key__": f"img{i:03d}", "cls": i % 4,
                "jpg": jpeg(i) if i % 2 else Image.new("RGB", (10, 12), (i, 0, 0))} for i in range(25)]
    index = write_shards(samples, tmp_path, "train", max_per_shard=10, classes=["a", "b", "c", "d"])

    assert sorted(os.listdir(tmp_path)) == ["train-000000.tar", "train-000001.tar", "train-000002.tar",
                                            "train-index.json"]
    data = json.loads((tmp_path / "train-index.json").read_text())
    assert data["num_samples"] == 25 and data["num_classes"] == 4 and data["classes"] == ["a", "b", "c", "d"]
    assert [(s["file"], s["num_samples"]) for s in data["shards"]] == [
        ("train-000000.tar", 10), ("train-000001.tar", 10), ("train-000002.tar", 5)]
    assert read_index(tmp_path, "train") == index

    read = read_all(tmp_path, "train")
    assert [s["key"] for s in read] == [s["__key__"] for s in samples]
    assert [s["label"] for s in read] == [s["cls"] for s in samples]
    assert read[1]["jpg"] == samples[1]["jpg"]
    assert Image.open(io.BytesIO(read[0]["jpg"])).size == (10, 12)
    pattern = list_shards(str(tmp_path / "train-{000000..000002}.tar"))
    assert pattern == list_shards(tmp_path, "train")
    assert validate_split(tmp_path, "train").num_samples == 25


def test_write_shards_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no samples"):
        write_shards([], tmp_path, "train")
    with pytest.raises(ValueError, match="must not contain"):
        write_shards([{"__key__": "a.b", "jpg": jpeg(0), "cls": 0}], tmp_path, "train")
    with pytest.raises(ValueError, match="out of range"):
        write_shards([{"__key__": "a", "jpg": jpeg(0), "cls": 5}], tmp_path, "train", num_classes=3)


def test_demo_shards(demo_shards: Path) -> None:
    train, val = read_index(demo_shards, "train"), read_index(demo_shards, "val")
    assert (train.num_samples, len(train.shards), val.num_samples, len(val.shards)) == (1437, 4, 360, 2)
    assert train.num_classes == val.num_classes == 10 and train.classes == [str(d) for d in range(10)]
    assert train.mean is not None and 0 < train.mean[0] < 1 and 0 < train.std[0] < 1
    val_labels = collections.Counter(s["label"] for s in read_all(demo_shards, "val"))
    assert set(val_labels) == set(range(10)) and min(val_labels.values()) >= 34  # stratified
    image = Image.open(io.BytesIO(read_all(demo_shards, "val")[0]["jpg"]))
    assert image.size == (32, 32) and image.mode == "RGB"
    stamp = (demo_shards / "train-000000.tar").stat().st_mtime_ns
    ensure_demo_shards(demo_shards, size=32)
    assert (demo_shards / "train-000000.tar").stat().st_mtime_ns == stamp


# --- transforms ------------------------------------------------------------------------------------


def test_transforms_and_mixup() -> None:
    transform = eval_transform(32)
    resize = next(t for t in transform.transforms if isinstance(t, T.Resize))
    assert resize.size in (36, [36])
    assert transform(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    assert mixup_fn(10, mixup=0.0, cutmix=0.0) is None
    mix = mixup_fn(10)
    assert isinstance(mix, Mixup)
    x, y = mix(torch.randn(4, 3, 32, 32), torch.arange(4))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 10)
    torch.testing.assert_close(y.sum(1), torch.ones(4))


def test_train_transform_survives_zero_bit_posterize() -> None:
    transform = train_transform(32)
    rand_augment = next(t for t in transform.transforms if type(t).__name__ == "RandAugment")
    posterize = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    image = Image.new("RGB", (32, 32), (200, 100, 50))
    assert posterize.aug_fn(image, 0).getextrema() == ((0, 0),) * 3  # Pillow 13 alone raises ValueError
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0
    assert posterize(image).getextrema() == ((0, 0),) * 3
    assert transform(image).shape == (3, 32, 32)


# --- webdataset DataModule -------------------------------------------------------------------------


@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 0), (2, 2)])
def test_train_loader_epoch_length(demo_shards: Path, monkeypatch: pytest.MonkeyPatch, world_size: int,
                                   num_workers: int) -> None:
    monkeypatch.setenv("RANK", str(world_size - 1))  # read by webdataset, as under torchrun
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    dm = WebDatasetDataModule(str(demo_shards), img_size=32, batch_size=32, num_workers=num_workers,
                              shuffle_buffer=200)
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.mean == read_index(demo_shards, "train").mean
    loader = dm.train_dataloader()
    expected = 1437 // world_size // 32
    assert len(loader) == expected
    for _ in range(2 if num_workers else 1):
        batches = list(loader)
        assert len(batches) == expected
        for x, y in batches:
            assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32
            assert y.shape == (32,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() < 10


def test_train_shards_disjoint_across_ranks(demo_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    urls = list_shards(demo_shards, "train")
    counts = list(read_index(demo_shards, "train").shards.values())
    readers = {(rank, worker): pipelines.TrainStream(
        urls, counts, batch_size=32, transform=identity, decode=key_and_shard, policy=ErrorPolicy(), rank=rank,
        world_size=2, shuffle_buffer=50) for rank in range(2) for worker in range(2)}
    monkeypatch.setenv("NUM_WORKERS", "2")  # read by webdataset's worker info, as inside a DataLoader worker
    for epoch in range(2):
        seen: dict[int, list[tuple[str, str]]] = {0: [], 1: []}
        for (rank, worker), stream in readers.items():
            monkeypatch.setenv("WORKER", str(worker))
            stream.epoch = epoch
            items = [item for item, _ in stream]
            assert len(items) == 11 * 32  # 22 batches per rank, half per worker
            seen[rank] += items
        keys = [key for items in seen.values() for key, _ in items]
        assert len(keys) == len(set(keys)) == 2 * 22 * 32
        assert {s for _, s in seen[0]}.isdisjoint({s for _, s in seen[1]})


def test_eval_parts_cover_each_sample_once() -> None:
    counts = [5, 7, 3]
    for readers in (1, 2, 3, 4, 7, 8):
        parts = pipelines.eval_parts(counts, readers)
        assert len(parts) == readers
        samples = [(shard, i) for part in parts for shard, start, stop in part for i in range(start, stop)]
        assert sorted(samples) == [(s, i) for s, n in enumerate(counts) for i in range(n)]
        shards_read = [{shard for shard, start, stop in part if stop > start} for part in parts]
        if readers <= len(counts):  # whole shards: no shard is opened by two readers
            assert all(a.isdisjoint(b) for i, a in enumerate(shards_read) for b in shards_read[i + 1:])


@pytest.mark.parametrize(("world_size", "num_workers"), [(2, 2), (3, 4), (1, 0), (4, 5)])
def test_eval_sees_every_sample_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, world_size: int,
                                     num_workers: int) -> None:
    keys = make_split(tmp_path, "val", shards=10, per_shard=7)  # 10 shards: whole for 4 readers, cut for 12, 20
    urls, counts = list_shards(tmp_path, "val"), list(read_index(tmp_path, "val").shards.values())
    monkeypatch.setenv("NUM_WORKERS", str(max(1, num_workers)))
    opened: list[tuple[str, int]] = []
    real_open_at = reader.open_at

    def recording_open_at(url: str, start: int) -> tuple:
        stream, position = real_open_at(url, start)
        opened.append((url, stream.tell()))
        return stream, position

    monkeypatch.setattr(reader, "open_at", recording_open_at)
    seen = []
    for rank in range(world_size):
        for worker in range(max(1, num_workers)):
            monkeypatch.setenv("WORKER", str(worker))
            mine = [key for (key, _), _ in pipelines.EvalStream(
                urls, counts, transform=identity, decode=key_and_shard, policy=ErrorPolicy(), rank=rank,
                world_size=world_size)]
            assert mine == sorted(mine, key=keys.index)  # file order
            seen += mine
    assert sorted(seen) == sorted(keys)
    # Each reader starts reading where its samples start: one open per shard piece, at distinct offsets.
    assert len(opened) == len(set(opened)) >= min(len(urls), world_size * max(1, num_workers))


def test_read_shard_range_starts_at_its_first_sample(tmp_path: Path) -> None:
    make_split(tmp_path, "val", shards=1, per_shard=6)
    url = list_shards(tmp_path, "val")[0]
    with tarfile.open(url) as tar:
        members = tar.getmembers()  # s0_i.cls, s0_i.jpg per sample
    assert reader.sample_offset(url, 4) == members[8].offset
    assert [s["key"] for s in reader.read_shard(url, 6, start=4, stop=6)] == ["s0_4", "s0_5"]
    assert [s["key"] for s in reader.read_shard(url, 6, start=1, stop=3)] == ["s0_1", "s0_2"]
    short = list(reader.read_shard(url, 8, start=4, stop=8))  # the index promises 8 samples
    assert isinstance(short[-1], ShardError) and "index says 8" in str(short[-1]) and short[-1].lost == 2


def test_val_loader_two_ranks_two_workers(demo_shards: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        dm = WebDatasetDataModule(str(demo_shards), img_size=32, batch_size=50, num_workers=2)
        for x, y in dm.val_dataloader():
            assert x.shape[1:] == (3, 32, 32) and y.dtype == torch.int64
            labels += y.tolist()
    assert len(labels) == dm.val_num_samples == 360
    assert sorted(labels) == sorted(s["label"] for s in read_all(demo_shards, "val"))


def test_lightning_fit_runs_the_announced_epoch(demo_shards: Path) -> None:
    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.head = torch.nn.Linear(3 * 32 * 32, 10)
            self.steps, self.val_seen = 0, 0

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            self.steps += 1
            return torch.nn.functional.cross_entropy(self.head(batch[0].flatten(1)), batch[1])

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
            self.val_seen += len(batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = WebDatasetDataModule(str(demo_shards), img_size=32, batch_size=64, num_workers=0, shuffle_buffer=100)
    probe = Probe()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(probe, datamodule=dm)
    assert trainer.num_training_batches == probe.steps == 1437 // 64
    assert probe.val_seen == dm.val_num_samples


# --- broken shards ---------------------------------------------------------------------------------


@pytest.fixture
def broken_split(tmp_path: Path) -> Path:
    """``bad``: 4 shards x 4 samples; shard 1's ``s1_2`` has no .cls, shard 2's ``s2_1`` is not an image,
    shard 3 is cut inside ``s3_1``'s image: 11 good samples, 5 lost."""
    make_split(tmp_path, "bad", shards=4, per_shard=4)
    originals = {s["key"]: s for s in read_all(tmp_path, "bad")}

    def raw(key: str) -> dict:
        return {"__key__": key, "cls": originals[key]["label"], "jpg": originals[key]["jpg"]}

    rewrite_shard(tmp_path / "bad-000001.tar",
                  [raw("s1_0"), raw("s1_1"), {"__key__": "s1_2", "jpg": originals["s1_2"]["jpg"]}, raw("s1_3")])
    rewrite_shard(tmp_path / "bad-000002.tar",
                  [raw("s2_0"), {**raw("s2_1"), "jpg": b"not a jpeg"}, raw("s2_2"), raw("s2_3")])
    truncate_in_sample(tmp_path / "bad-000003.tar", member=3)  # members: s3_0.cls, s3_0.jpg, s3_1.cls, s3_1.jpg
    return tmp_path


@pytest.mark.parametrize(("shard", "key", "reason"), [
    ("bad-000001.tar", "s1_2", "no .cls"),
    ("bad-000002.tar", "s2_1", "undecodable image"),
    ("bad-000003.tar", "s3_0", "truncated"),
])
def test_broken_sample_raises_shard_error(broken_split: Path, shard: str, key: str, reason: str) -> None:
    for other in {"bad-000001.tar", "bad-000002.tar", "bad-000003.tar"} - {shard}:
        other_index = read_index(broken_split, "bad")
        other_index.shards.pop(other)
        write_index(broken_split, other_index)
    with pytest.raises(ShardError, match=reason) as info:
        validate_split(broken_split, "bad")
    assert str(broken_split / shard) in str(info.value) and repr(key) in str(info.value)


def test_broken_sample_raises_in_loader(broken_split: Path) -> None:
    dm = WebDatasetDataModule(str(broken_split), train_split="bad", val_split="bad", img_size=32,
                              batch_size=4, num_workers=0)
    with pytest.raises(ShardError, match="s1_2"):
        list(dm.val_dataloader())


def test_missing_shard(broken_split: Path) -> None:
    (broken_split / "bad-000000.tar").unlink()
    with pytest.raises(ShardError, match="bad-000000.tar.*missing"):
        list_shards(broken_split, "bad")
    dm = WebDatasetDataModule(str(broken_split), train_split="bad", val_split="bad")
    with pytest.raises(ShardError, match="bad-000000.tar"):
        dm.setup("fit")


def test_skip_counts_broken_samples(broken_split: Path) -> None:
    with pytest.warns(UserWarning) as warned:
        report = validate_split(broken_split, "bad", on_error="skip")
    assert (report.num_samples, report.num_skipped) == (11, 5)
    messages = [str(w.message) for w in warned]
    assert len(messages) == 3 and all(m.startswith("skipping: shard ") for m in messages)
    assert "'s1_2'" in messages[0] and "'s2_1'" in messages[1] and "after sample 's3_0'" in messages[2]

    dm = WebDatasetDataModule(str(broken_split), train_split="bad", val_split="bad", img_size=32,
                              batch_size=4, num_workers=2, on_error="skip", shuffle_buffer=4)
    assert len(labels_of(dm.val_dataloader())) == 11
    assert dm.val_skipped_samples == dm.skipped_samples == 5  # counted in the worker processes
    assert len(list(dm.train_dataloader())) == 16 // 4  # the epoch keeps its length
    assert dm.skipped_samples > dm.val_skipped_samples == 5


def test_training_on_unreadable_shards_stops(tmp_path: Path) -> None:
    make_split(tmp_path, "junk", shards=1, per_shard=8)
    (tmp_path / "junk-000000.tar").write_bytes(b"\0" * 100)
    dm = WebDatasetDataModule(str(tmp_path), train_split="junk", val_split="junk", img_size=32, batch_size=4,
                              num_workers=0, on_error="skip")
    with pytest.warns(UserWarning, match="skipping"), pytest.raises(ShardError, match="no readable sample"):
        next(iter(dm.train_dataloader()))


# --- ImageFolder -----------------------------------------------------------------------------------


def make_folder_tree(root: Path, per_class: dict[str, int], classes: tuple[str, ...] = ("cat", "dog", "emu")
                     ) -> None:
    for split, count in per_class.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                suffix = ".png" if i == 0 else ".JPEG"
                Image.new("RGB", (40 + i, 30), (80 * c, 10 * i, 0)).save(folder / f"{name}.{i}{suffix}")


def test_image_folder_datamodule(tmp_path: Path) -> None:
    make_folder_tree(tmp_path, {"train": 4, "val": 2})
    dm = ImageFolderDataModule(str(tmp_path), img_size=32, batch_size=4, num_workers=0)
    assert dm.num_classes == 3 and dm.classes == ["cat", "dog", "emu"] and dm.val_num_samples == 6
    batches = list(dm.train_dataloader())
    assert len(batches) == 3
    assert all(x.shape == (4, 3, 32, 32) and y.dtype == torch.int64 for x, y in batches)
    assert sorted(labels_of(dm.val_dataloader())) == [0, 0, 1, 1, 2, 2]


def test_image_folder_val_only_tree_evaluates(tmp_path: Path) -> None:
    make_folder_tree(tmp_path, {"val": 2})
    dm = ImageFolderDataModule(str(tmp_path), img_size=32, batch_size=4, num_workers=0, mean=(0.5, 0.5, 0.5))
    dm.setup("validate")
    assert dm.classes == ["cat", "dog", "emu"] and dm.val_num_samples == 6
    assert dm.mean == (0.5, 0.5, 0.5) and dm.std == IMAGENET_DEFAULT_STD
    images = torch.cat([x for x, _ in dm.val_dataloader()])
    expected = eval_transform(32, (0.5,) * 3, IMAGENET_DEFAULT_STD)(Image.open(tmp_path / "val/cat/cat.0.png"))
    torch.testing.assert_close(images[0], expected)  # the mean/std setting normalises the eval images
    with pytest.raises(FileNotFoundError, match=f"ImageFolder split {tmp_path / 'train'} does not exist"):
        dm.setup("fit")


def test_image_folder_empty_trees_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'val'} does not exist"):
        ImageFolderDataModule(str(tmp_path)).setup("validate")
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'val'} has no class folders"):
        ImageFolderDataModule(str(tmp_path)).setup("validate")
    (tmp_path / "val" / "cat").mkdir()
    (tmp_path / "val" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="has class folders but no images"):
        ImageFolderDataModule(str(tmp_path)).setup("validate")


def test_datamodules_default_to_imagenet_normalisation(tmp_path: Path) -> None:
    make_split(tmp_path, "val", shards=1, per_shard=2)  # an index without mean/std
    dm = WebDatasetDataModule(str(tmp_path))
    assert dm.mean == IMAGENET_DEFAULT_MEAN and dm.std == IMAGENET_DEFAULT_STD
    assert WebDatasetDataModule(str(tmp_path), mean=(0.1, 0.2, 0.3)).mean == (0.1, 0.2, 0.3)
    assert ImageFolderDataModule(str(tmp_path)).mean == IMAGENET_DEFAULT_MEAN


# --- data/make_shards.py ---------------------------------------------------------------------------


def test_make_shards(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    make_folder_tree(src, {"train": 4, "val": 2})
    make_shards = load_script(REPO / "data" / "make_shards.py")
    args = ["--src", str(src), "--out", str(out), "--max-per-shard", "5"]
    assert make_shards.main([*args, "--verify"]) == 0

    train, val = read_index(out, "train"), read_index(out, "val")
    assert list(train.shards.values()) == [5, 5, 2] and list(val.shards.values()) == [5, 1]
    assert train.classes == val.classes == ["cat", "dog", "emu"]
    samples = read_all(out, "train")
    assert sorted(s["key"] for s in samples) == sorted(f"{c}_{c}_{i}" for c in ("cat", "dog", "emu")
                                                       for i in range(4))
    for sample in samples:
        name, i = sample["key"].split("_")[1:]
        assert sample["label"] == ["cat", "dog", "emu"].index(name)
        original = src / "train" / name / f"{name}.{i}{'.png' if i == '0' else '.JPEG'}"
        assert sample["jpg"].startswith(b"\xff\xd8\xff")
        if i != "0":
            assert sample["jpg"] == original.read_bytes()  # JPEGs are stored as they are

    shard_bytes = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    assert make_shards.main(args) == 0
    assert "complete, skipped" in capsys.readouterr().out
    (out / "train-index.json").unlink()
    (out / "train-000002.tar").unlink()
    (out / "train-000001.tar").rename(out / "train-000001.tar.part")
    assert make_shards.main(args) == 0
    assert "resumed at shard 1" in capsys.readouterr().out
    assert read_index(out, "train") == train
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == shard_bytes
    assert not list(out.glob("*.part"))


def test_index_mismatch_is_reported(tmp_path: Path) -> None:
    make_split(tmp_path, "val", shards=2, per_shard=3)
    index = read_index(tmp_path, "val")
    write_index(tmp_path, ShardIndex(index.split, {**index.shards, "val-000001.tar": 4}, index.num_classes))
    with pytest.raises(ShardError, match="3 samples, the index says 4"):
        validate_split(tmp_path, "val")


# --- resume and reproducibility ----------------------------------------------------------------------


class Linear(L.LightningModule):
    """A linear classifier; asks for ``estimated_stepping_batches`` as RMeeToModule does (``ask_steps``)."""

    def __init__(self, size: int, ask_steps: bool = True) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3 * size * size, 3)
        self.ask_steps = ask_steps

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.head(batch[0].flatten(1)), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.ask_steps:
            assert self.trainer.estimated_stepping_batches == 2 * 12
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Killed(Exception):
    """Stands for a kill mid-epoch."""


class Recorder(L.Callback):
    """Hashes of the images trained on, and the losses; raises before batch ``stop_at`` (a kill)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.images: list[str] = []
        self.losses: list[float] = []
        self.stop_at = stop_at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.stop_at:
            raise Killed  # no checkpoint beyond the last one written
        self.images += [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in batch[0]]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def fit(root: Path, recorder: Recorder, ckpt_dir: Path | None = None, ckpt_path: str | None = None,
        ask_steps: bool = True, seed: int = 0, num_workers: int = 2, folder: bool = False) -> None:
    L.seed_everything(seed)
    if folder:  # an ImageFolder tree of 96 training images, 12 batches of 8 as the shards
        dm = ImageFolderDataModule(str(root), img_size=16, batch_size=8, num_workers=num_workers,
                                   augment=Augment(crop_scale=(0.3, 1.0)))
    else:
        dm = WebDatasetDataModule(str(root), img_size=16, batch_size=8, num_workers=num_workers, shuffle_buffer=20)
    callbacks: list[L.Callback] = [recorder]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_last=True))
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=ckpt_dir is not None,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=callbacks)
    trainer.fit(Linear(16, ask_steps), datamodule=dm, ckpt_path=ckpt_path)


@pytest.fixture
def small_split(tmp_path: Path) -> Path:
    """4 train shards x 24 samples (12 batches of 8 per epoch), 1 val shard."""
    make_split(tmp_path, "train", shards=4, per_shard=24)
    make_split(tmp_path, "val", shards=1, per_shard=8)
    return tmp_path


@pytest.fixture
def small_folder(tmp_path: Path) -> Path:
    """An ImageFolder tree of 3 classes x 32 training images (12 batches of 8 per epoch), 2 val each."""
    make_folder_tree(tmp_path / "tree", {"train": 32, "val": 2})
    return tmp_path / "tree"


@pytest.mark.parametrize(("stop_at", "ask_steps", "folder"), [(5, True, False), (17, False, False),
                                                              (7, True, True), (15, False, True)])
def test_killed_fit_resumes_the_epoch_where_it_stopped(request: pytest.FixtureRequest, tmp_path: Path, stop_at: int,
                                                       ask_steps: bool, folder: bool) -> None:
    root = request.getfixturevalue("small_folder" if folder else "small_split")
    whole = Recorder()
    fit(root, whole, ask_steps=ask_steps, folder=folder)
    assert len(whole.images) == 2 * 12 * 8

    killed = Recorder(stop_at=stop_at)
    with pytest.raises(Killed):
        fit(root, killed, tmp_path / "ckpt", ask_steps=ask_steps, folder=folder)
    assert torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)["global_step"] == stop_at
    resumed = Recorder()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(root, resumed, tmp_path / "ckpt", str(tmp_path / "ckpt/last.ckpt"), ask_steps=ask_steps, folder=folder)
    assert not [w for w in caught if "not resumable" in str(w.message)]
    # The same images (samples and their augmentation), in the same order: nothing twice, nothing skipped.
    assert killed.images + resumed.images == whole.images
    assert killed.losses + resumed.losses == pytest.approx(whole.losses)


@pytest.mark.parametrize("folder", [False, True])
def test_runs_with_the_same_seed_log_the_same_losses(request: pytest.FixtureRequest, folder: bool) -> None:
    root = request.getfixturevalue("small_folder" if folder else "small_split")
    first, second, other = Recorder(), Recorder(), Recorder()
    fit(root, first, num_workers=1, folder=folder)
    fit(root, second, num_workers=1, folder=folder)
    fit(root, other, num_workers=1, seed=1, folder=folder)
    assert first.losses == second.losses and len(first.losses) == 24
    assert first.images == second.images
    assert other.images != first.images  # the seed, not a constant, drives shuffling and augmentation


def test_loader_state_is_checked(small_split: Path) -> None:
    loader = WebDatasetDataModule(str(small_split), img_size=16, batch_size=8, num_workers=0).train_dataloader()
    with pytest.raises(ValueError, match="13 batches done, an epoch has 12"):
        loader.load_state_dict({"epoch": 0, "batches": 13})
    with pytest.raises(ValueError, match="lacks an int 'epoch'"):
        loader.load_state_dict({"batches": 3})
    loader.load_state_dict({"epoch": 0, "batches": 12})  # a finished epoch: the next pass is epoch 1
    assert len(list(loader)) == 12 and loader.state_dict() == {"epoch": 1, "batches": 12}


# --- configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda path: path.name)
def test_config_data_sections_build(config: Path) -> None:
    """Every recipe's ``data:`` section parses and builds as LightningCLI would (typos and old keys fail)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    section = yaml.safe_load(config.read_text())["data"]
    dm = parser.instantiate(parser.parse_object({"data": section})).data
    assert isinstance(dm, L.LightningDataModule) and isinstance(dm.augment, Augment)


def test_config_data_section_with_an_unknown_key_fails() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data")
    section = {"class_path": "rmeeto.data.WebDatasetDataModule", "init_args": {"root": "x", "reprob": 0.0}}
    with pytest.raises(Exception, match="reprob"):  # the key moved under augment
        parser.parse_object({"data": section})
