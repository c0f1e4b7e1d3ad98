"""Generated colour photos for the decoding benchmarks: smooth colour fields with a grain, saved as JPEG.

Usage:
    python bench/photos.py OUT_FOLDER [--count 1000] [--classes 4] [--width 1024] [--height 768] [--quality 90]

Writes OUT_FOLDER/class_<k>/<i>.jpg (a layout `tlfeat extract` reads). Like a
camera's photos, and unlike plain noise, they compress to about 200 kB at
1024x768, quality 90. The same arguments give the same files.
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def _write(job: tuple[Path, int, int, int, int]) -> None:
    path, index, width, height, quality = job
    rng = np.random.default_rng(index)
    # Colour blobs: a tiny random image blown up; grain: a crop of one noise texture, the same for every photo.
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    x, y = int(rng.integers(0, width // 4)), int(rng.integers(0, height // 4))
    grain = _texture(width + width // 4, height + height // 4).crop((x, y, x + width, y + height))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.blend(base, grain, 0.15).save(path, quality=quality)


_TEXTURES: dict[tuple[int, int], Image.Image] = {}


def _texture(width: int, height: int) -> Image.Image:
    if (width, height) not in _TEXTURES:
        grain = np.random.default_rng(0).normal(128, 32, (height, width, 1)).clip(0, 255).astype(np.uint8)
        _TEXTURES[(width, height)] = Image.fromarray(np.repeat(grain, 3, axis=2))
    return _TEXTURES[(width, height)]


def make_photos(
    folder: Path, count: int, classes: int = 4, width: int = 1024, height: int = 768, quality: int = 90,
    suffix: str = ".jpg",
) -> list[Path]:
    """Write `count` photos under folder/class_<k>/ (skipping files already there) and return their paths.

    `suffix` ".png" writes the same pictures losslessly.
    """
    jobs = [(folder / f"class_{i % classes}" / f"{i:05d}{suffix}", i, width, height, quality) for i in range(count)]
    todo = [job for job in jobs if not job[0].exists()]
    if todo:
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            list(pool.map(_write, todo, chunksize=16))
    return [job[0] for job in jobs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--quality", type=int, default=90)
    args = parser.parse_args()
    paths = make_photos(args.out, args.count, args.classes, args.width, args.height, args.quality)
    print(f"{len(paths)} photos in {args.out}")


if __name__ == "__main__":
    main()
