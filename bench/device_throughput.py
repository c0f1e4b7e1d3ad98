"""Compute alone vs end-to-end extraction, per backbone and batch size, in one process (made for a GPU).

Usage:
    python bench/device_throughput.py --data DIR [--copies 8] [--backbones resnet101 vgg16 efficientnet_lite0]
                                      [--batch-sizes 256 512] [--workers N ...] [--image-size N] [--limit N]

DIR holds class folders of images (Scene15's train/). `--copies` K makes a
dataset of K hard-linked (or copied) versions of every file (distinct paths, the same bytes),
so a fast device still has seconds of work; `--limit` keeps the first N files of each class.
Weights: none (random) for the keras.applications backbones, so their figures
are timings only; the offline ImageNet weights for efficientnet_lite*. For each
backbone and batch size, one JSON line:

  compute_alone_img_s   tlfeat's extractor on the images already decoded into memory as uint8: every
                        batch dispatched (scaling inside the compiled model, the backend's precision
                        policy: mixed_bfloat16 on a GPU) before any result is fetched; compiled before
                        the clock
  extract_img_s         tlfeat.extract of the whole dataset into a fresh cache, the extractor and the
                        decoding pool already warm (a first extract of the same data, reported as
                        extract_first_img_s, started the pool); wall time from the call to its return:
                        scan, decoding, compute, shards, final write
  extract_loop_img_s    the same run's decode-compute-shard loop alone (ExtractSummary.images_per_s):
                        what the scan and the final write, which run before and after it, cost
  ratio                 extract_img_s / compute_alone_img_s
  extract_s, loop_s     the warm run's seconds, and its loop's; scan_s: one scan of the dataset alone, so
                        extract_s - loop_s - scan_s is about what the final write costs
With --workers N ..., one line per decoding pool size (default: one per core).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's tlfeat, run from anywhere


def linked_copies(data: Path, dest: Path, copies: int, limit: int | None) -> Path:
    """dest/<class>/<k>-<name>: `copies` hard links to each of the first `limit` files of each data/<class>/."""
    files = [p for folder in sorted(data.iterdir()) if folder.is_dir() for p in sorted(folder.iterdir())[:limit]]
    for path in files:
        folder = dest / path.parent.relative_to(data)
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            try:
                os.link(path, folder / f"{k}-{path.name}")
            except OSError:  # another file system
                shutil.copyfile(path, folder / f"{k}-{path.name}")
    return dest


def measure(
    backbone: str, batch_size: int, image_size: int | None, data: Path, work: Path, workers: list[int | None]
) -> Iterator[dict]:
    """One result per decoding pool size, each as soon as it is measured (a time limit keeps the earlier ones)."""
    import keras

    from tlfeat.backbones import get_backbone
    from tlfeat.data.batches import iter_batches
    from tlfeat.data.cores import default_workers
    from tlfeat.data.scan import scan_dataset
    from tlfeat.extraction.run import extract
    from tlfeat.runtime import get_extractor

    spec = get_backbone(backbone)
    size = image_size or spec.input_size
    weights = "imagenet" if backbone.startswith("efficientnet_lite") else "none"
    started = time.perf_counter()
    extractor = get_extractor(spec, weights, size, batch_size)
    built = time.perf_counter()
    scan_started = time.perf_counter()
    scan = scan_dataset(data)
    scan_s = time.perf_counter() - scan_started  # the serial step before extract's loop (warm page cache)
    files = [scan.root / e.relpath for e in scan.entries]
    batches = [b.pixels[b.ok].copy() for b in iter_batches(files, size, batch_size)]  # copied: buffers are reused
    extractor(batches[0])  # compiles
    compiled = time.perf_counter()
    start = time.perf_counter()
    pending = [extractor.submit(pixels) for pixels in batches]
    n = sum(len(p.result()) for p in pending)
    compute_rate = n / (time.perf_counter() - start)
    del batches, pending

    for pool_size in workers:
        rates = []
        for run in ("first", "warm"):
            out = work / f"{backbone}-{batch_size}-{run}.h5"
            start = time.perf_counter()
            summary = extract(data, out, backbone=backbone, weights=weights, image_size=size,
                              batch_size=batch_size, progress=False, workers=pool_size)
            rates.append(summary.n_computed / (time.perf_counter() - start))
            out.unlink()
        yield {
            "backbone": backbone, "weights": weights, "batch_size": batch_size, "image_size": size,
            "workers": pool_size or default_workers(), "compute": extractor.compute,
            "keras_backend": keras.backend.backend(), "images": n,
            "build_s": built - started, "compile_s": compiled - built, "compute_alone_img_s": compute_rate,
            "extract_first_img_s": rates[0], "extract_img_s": rates[1],
            "extract_loop_img_s": summary.images_per_s, "ratio": rates[1] / compute_rate,
            "extract_s": summary.n_computed / rates[1], "loop_s": summary.n_computed / summary.images_per_s,
            "scan_s": scan_s,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--limit", type=int, help="only the first N files of each class")
    parser.add_argument("--backbones", nargs="+", default=["resnet101", "vgg16", "efficientnet_lite0"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--workers", type=int, nargs="+", help="decoding pool sizes (default: one per core)")
    parser.add_argument("--image-size", type=int, help="default: each backbone's own")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = linked_copies(args.data, Path(tmp) / "data", args.copies, args.limit)
        for backbone in args.backbones:
            for batch_size in args.batch_sizes:
                for result in measure(backbone, batch_size, args.image_size, data, Path(tmp), args.workers or [None]):
                    print(json.dumps(result), flush=True)
    print(f"command: python bench/device_throughput.py {' '.join(sys.argv[1:])}", file=sys.stderr)


if __name__ == "__main__":
    main()
