"""End-to-end extraction memory against dataset size: peak RSS of `tlfeat extract` on generated PNGs.

Usage:
    python bench/extract_scale.py [--images 10000 100000] [--image-size 32] [--classes 10] [--distinct 1000]
        [--root DIR]

Generates max(--images) 48x48 PNG files (``class_k/img_NNNNNNN.png``, the test
suite's pictures: colour and stripes by class, noise by image): `--distinct`
different pictures, the other files hard links to them (same class), so that
making 100,000 files takes seconds, not the hour that 2 busy cores take to
encode them. Then for each size N extracts the first N files (a folder of hard
links per N: no copies)
with EfficientNet-Lite0's bundled ImageNet weights at ``--image-size``, each run
in its own fresh process. Reports the whole process's peak RSS (``ru_maxrss``,
TensorFlow included), seconds and images/s, and the ratio of the peaks.

Files live under ROOT (a temporary folder by default) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from isolated import bench_command, finish_report, parse_bench_args, run_isolated

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def _child(kind: str, data: str, out: str, image_size: str) -> dict:
    from tlfeat.extraction.run import extract

    start = time.perf_counter()
    summary = extract(Path(data), Path(out), image_size=int(image_size), progress=False)
    return {"images": summary.n_images, "computed": summary.n_computed, "seconds": time.perf_counter() - start,
            "images_per_s": summary.images_per_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def make_images(root: Path, n: int, classes: int, distinct: int) -> None:
    from conftest import make_image  # the test suite's generated pictures

    marker = root / f".made-{n}-{classes}-{distinct}"
    if marker.exists():
        return
    distinct -= distinct % classes  # picture i % distinct has the class of file i
    for i in range(n):
        path = root / f"class_{i % classes}" / f"img_{i:07d}.png"
        if path.exists():
            continue
        if i < distinct:
            make_image(path, i % classes, i, size=(48, 48))
        else:
            os.link(root / f"class_{i % classes}" / f"img_{i % distinct:07d}.png", path)
    marker.touch()


def subset(root: Path, target: Path, n: int, classes: int) -> Path:
    """The first n images of `root` as hard links under `target`."""
    for i in range(n):
        link = target / f"class_{i % classes}" / f"img_{i:07d}.png"
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.link(root / f"class_{i % classes}" / f"img_{i:07d}.png", link)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--distinct", type=int, default=1000, help="different pictures; the other files link to them")
    parser.add_argument("--root", type=Path, help="where the images go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="leave the generated images for the next run")
    args = parse_bench_args(parser, _child)
    if args is None:
        return
    command = bench_command()
    root = args.root or Path(tempfile.mkdtemp(prefix="tlfeat-extract-scale-"))
    report: dict = {"command": command, "image_size": args.image_size, "runs": []}
    try:
        started = time.perf_counter()
        make_images(root / "all", max(args.images), args.classes, args.distinct)
        print(f"{max(args.images)} PNG files ({args.distinct} different) made in {time.perf_counter() - started:.0f} s", flush=True)
        for n in args.images:
            data = subset(root / "all", root / f"n{n}", n, args.classes)
            out = root / f"n{n}.h5"
            out.unlink(missing_ok=True)
            result = run_isolated(__file__, "extract", str(data), str(out), str(args.image_size))
            assert result["images"] == n and result["computed"] == n, result
            report["runs"].append(result)
            print(f"{n} images at {args.image_size} px: {result['seconds']:.0f} s "
                  f"({result['images_per_s']:.0f} img/s), peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
            out.unlink()
            shutil.rmtree(data)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    runs = report["runs"]
    if len(runs) > 1:
        print(f"peak RSS ratio {runs[-1]['images']} vs {runs[0]['images']} images: "
              f"{runs[-1]['peak_rss_mb'] / runs[0]['peak_rss_mb']:.2f}x")
    finish_report(command, report, args.json)


if __name__ == "__main__":
    main()
