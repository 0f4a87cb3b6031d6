"""Write the bundled demo shards (scikit-learn digits, upscaled to RGB) with their indexes.

    python data/make_demo.py --out data/demo --size 64
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rmeeto.data.demo import DEMO_SIZE, ensure_demo_shards, write_demo_shards
from rmeeto.data.shards import split_summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    parser.add_argument("--size", type=int, default=DEMO_SIZE, help="image side in pixels")
    parser.add_argument("--force", action="store_true", help="rewrite even if complete shards are there")
    args = parser.parse_args(argv)
    out = write_demo_shards(args.out, args.size) if args.force else ensure_demo_shards(args.out, args.size)
    for split in ("train", "val"):
        print(split_summary(out, split))
    return 0


if __name__ == "__main__":
    sys.exit(main())
