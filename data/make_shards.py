"""Write webdataset shards from an ImageFolder tree (``SRC/train/<class>/*.JPEG``, ``SRC/val/<class>/*``).

    python data/make_shards.py --src /imagenet --out /shards --max-per-shard 1000

Labels are sorted-class-name indices of the train split, as torchvision's ImageFolder gives them. JPEG files
are stored byte for byte; other images are converted to JPEG. The train order is shuffled (``--seed``) so
each shard mixes classes; val keeps folder order. A split whose index exists is skipped (``--force``
rewrites it); an interrupted split resumes after its last finished shard.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm import tqdm

from rmeeto.data.reader import validate_split
from rmeeto.data.shards import PART_SUFFIX, completed_shards, encode_jpeg, index_path, write_shards

JPEG_MAGIC = b"\xff\xd8\xff"


def jpeg_bytes(path: str) -> bytes:
    """The file's bytes if it is a JPEG (by content, not name), else the image re-encoded as JPEG."""
    data = Path(path).read_bytes()
    if data.startswith(JPEG_MAGIC):
        return data
    with Image.open(path) as image:
        return encode_jpeg(image.convert("RGB"))


def sample_key(path: str, root: Path) -> str:
    """``<class>_<file stem>`` with the characters webdataset splits keys on ('.', '/') replaced."""
    relative = Path(path).relative_to(root)
    return str(relative.with_suffix("")).replace("/", "_").replace(".", "_")


def folder_samples(items: Sequence[tuple[str, int]], root: Path) -> Iterator[dict]:
    """``{"__key__", "jpg", "cls"}`` for each ``(path, label)``."""
    for path, label in items:
        yield {"__key__": sample_key(path, root), "jpg": jpeg_bytes(path), "cls": label}


def remove_split(out: Path, split: str) -> None:
    """Delete a split's index and shards, finished or not."""
    index_path(out, split).unlink(missing_ok=True)
    for shard in out.glob(f"{split}-*.tar*"):
        shard.unlink()


def write_split(src: Path, out: Path, split: str, classes: list[str], max_per_shard: int,
                seed: int | None) -> None:
    """Shard ``src/split`` into ``out``, resuming after the finished shards; ``seed`` shuffles the order."""
    class_to_idx = {name: i for i, name in enumerate(classes)}
    extra = sorted(set(find_classes(str(src / split))[0]) - set(classes))
    if extra:
        raise ValueError(f"{src / split} has classes missing from the train split: {extra[:5]}")
    items = make_dataset(str(src / split), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if seed is not None:
        random.Random(seed).shuffle(items)
    start = min(completed_shards(out, split), len(items) // max_per_shard)
    done = start * max_per_shard
    for stale in out.glob(f"{split}-*.tar{PART_SUFFIX}"):
        stale.unlink()
    progress = tqdm(folder_samples(items[done:], src / split), desc=split, total=len(items), initial=done,
                    unit="img")
    index = write_shards(progress, out, split, max_per_shard, classes=classes, start_shard=start,
                         meta={"source": str(src / split)})
    resumed = f" (resumed at shard {start})" if start else ""
    print(f"{split}: {index.num_samples} samples in {len(index.shards)} shards{resumed}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, required=True, help="ImageFolder root holding the split folders")
    parser.add_argument("--out", type=Path, required=True, help="output directory for shards and indexes")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], help="split folders; the first "
                        "defines the classes")
    parser.add_argument("--max-per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed for the first split's order")
    parser.add_argument("--force", action="store_true", help="rewrite splits that are already complete")
    parser.add_argument("--verify", action="store_true", help="read back and decode every sample")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    classes = find_classes(str(args.src / args.splits[0]))[0]
    for number, split in enumerate(args.splits):
        if args.force:
            remove_split(args.out, split)
        if index_path(args.out, split).is_file():
            print(f"{split}: complete, skipped (--force rewrites it)")
        else:
            write_split(args.src, args.out, split, classes, args.max_per_shard,
                        args.seed if number == 0 else None)
        if args.verify:
            report = validate_split(args.out, split)
            print(f"{split}: verified {report.num_samples} samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
