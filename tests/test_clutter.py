"""Tests for rmeeto.data.clutter: the cluttered-digits generator and its shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rmeeto.data import WebDatasetDataModule, list_shards, read_index
from rmeeto.data.clutter import (
    BACKGROUND_MEAN,
    CLEARANCE,
    DIGIT_SIZE,
    NOISE_STD,
    ClutterSample,
    clutter_samples,
    compose,
    crop_border,
    ensure_clutter_shards,
    split_ids,
)
from rmeeto.data.demo import digit_images
from rmeeto.data.reader import decode_image, read_shards

SMALL = {"size": 32, "digit_size": 16}  # test shards: 4 tokens of 8 px per digit side at most
INK = BACKGROUND_MEAN + 7 * NOISE_STD  # brighter than this is a stroke, never noise (7 sigma)


def digit_id(sample: ClutterSample) -> int:
    """The sklearn digit index a sample was made from (its key is ``clutter{id}_{copy}``)."""
    return int(sample.key.removeprefix("clutter").split("_")[0])


def test_samples_are_deterministic_and_independent_of_count() -> None:
    first = list(clutter_samples("train", limit=6))
    again = list(clutter_samples("train", limit=3))
    assert [s.key for s in again] == [s.key for s in first[:3]]
    for a, b in zip(first[:3], again, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        assert (a.label, a.box) == (b.label, b.box)
    assert not np.array_equal(first[0].image, first[1].image)


def test_copies_of_a_digit_differ() -> None:
    samples = list(clutter_samples("val", copies=2))
    half = len(samples) // 2
    once, twice = samples[0], samples[half]
    assert digit_id(once) == digit_id(twice) and once.key != twice.key
    assert once.label == twice.label
    assert not np.array_equal(once.image, twice.image)


def test_label_is_the_pasted_digit_and_it_lies_inside_the_eval_crop() -> None:
    digits, labels = digit_images(DIGIT_SIZE)
    size = 64
    border = crop_border(size)
    for sample in clutter_samples("val", size=size, limit=40):
        i = digit_id(sample)
        top, left, bottom, right = sample.box
        assert sample.image.shape == (size, size) and sample.image.dtype == np.uint8
        assert (bottom - top, right - left) == (DIGIT_SIZE, DIGIT_SIZE)
        assert border <= top and border <= left and bottom <= size - border and right <= size - border
        assert sample.label == labels[i]
        # layers combine by maximum: every stroke of the digit is there at full strength
        assert np.all(sample.image[top:bottom, left:right] >= digits[i])


def test_clutter_keeps_clear_of_the_digit() -> None:
    """In the ring around the digit there is only noise, no fragment ink."""
    for sample in clutter_samples("train", limit=40):
        top, left, bottom, right = sample.box
        ring = np.ones_like(sample.image, dtype=bool)
        ring[max(top - CLEARANCE, 0):bottom + CLEARANCE, max(left - CLEARANCE, 0):right + CLEARANCE] = False
        ring = ~ring
        ring[top:bottom, left:right] = False
        assert sample.image[ring].max() < INK
    ink = [(s.image > INK).sum() - (s.image[s.box[0]:s.box[2], s.box[1]:s.box[3]] > INK).sum()
           for s in clutter_samples("train", limit=40)]
    assert np.mean(ink) > 20  # the background does hold fragments


def test_val_uses_the_demo_split_and_fragments_of_its_own_split() -> None:
    _, labels = digit_images(8)
    ids = split_ids(labels)
    assert len(ids["val"]) == 360 and len(ids["train"]) == 1437
    assert not set(ids["val"]) & set(ids["train"])
    assert [digit_id(s) for s in clutter_samples("val", limit=5)] == list(ids["val"][:5])


def test_bad_settings_are_refused() -> None:
    rng = np.random.default_rng(0)
    digit = np.zeros((30, 30), np.uint8)
    with pytest.raises(ValueError, match="does not fit"):
        compose(rng, digit, digit[None], size=32)
    with pytest.raises(ValueError, match="unknown split"):
        next(clutter_samples("test"))


@pytest.fixture(scope="module")
def clutter_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_clutter_shards(tmp_path_factory.mktemp("clutter"), train_copies=1, **SMALL)


def test_shards_round_trip(clutter_shards: Path) -> None:
    val = read_index(clutter_shards, "val")
    train = read_index(clutter_shards, "train")
    assert (train.num_samples, val.num_samples, val.num_classes) == (1437, 360, 10)
    assert val.meta["image_size"] == 32 and train.mean == val.mean and 0 < train.mean[0] < 0.5
    read = list(read_shards({"url": url} for url in list_shards(clutter_shards, "val")))
    written = list(clutter_samples("val", **SMALL))
    assert [(r["key"], r["label"]) for r in read] == [(s.key, s.label) for s in written]
    for row, sample in zip(read[:20], written[:20], strict=True):
        image = np.asarray(decode_image(row))[..., 0].astype(int)
        assert np.abs(image - sample.image).mean() < 3  # JPEG at quality 95


def test_ensure_keeps_complete_shards_and_rewrites_other_settings(clutter_shards: Path) -> None:
    index = clutter_shards / "val-index.json"
    stamp = index.stat().st_mtime_ns
    ensure_clutter_shards(clutter_shards, train_copies=1, **SMALL)
    assert index.stat().st_mtime_ns == stamp


def test_datamodule_reads_the_shards(clutter_shards: Path) -> None:
    dm = WebDatasetDataModule(str(clutter_shards), img_size=32, batch_size=8, num_workers=0)
    dm.setup("validate")
    images, labels = next(iter(dm.val_dataloader()))
    assert images.shape == (8, 3, 32, 32) and labels.tolist() == [s.label for s in clutter_samples("val", limit=8)]
    assert dm.mean == read_index(clutter_shards, "train").mean
