"""Memory of extract's final cache write: the run's rows as they are vs stacked into one matrix first.

Usage:
    python bench/final_write.py [--rows 20000] [--dim 1280] [--json OUT]

A run holds its features as rows (views into the batches it computed or
reused). `tlfeat.cache_writer.write_cache` takes those rows and writes them a chunk at
a time; the way before it stacked them into one (N, D) matrix and cast it
(`np.stack(rows).astype(np.float32)`). Each side runs in its own process and
reports the peak of Python-traced memory (tracemalloc: numpy arrays included)
from just before the call to its end, beside the size of the rows themselves;
both files are checked to hold the same features.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from pathlib import Path

from isolated import bench_command, finish_report, parse_bench_args, run_isolated

SIDES = ("rows", "stacked")


def _child(side: str, rows: str, dim: str, out: str) -> dict:
    import numpy as np

    from tlfeat import cache, cache_writer

    n, d = int(rows), int(dim)
    batches = [np.random.default_rng(i).standard_normal((32, d)).astype(np.float32) for i in range(-(-n // 32))]
    features = [row for batch in batches for row in batch][:n]
    labels, paths, split, zeros = np.zeros(n, np.int32), [f"c/{i}.png" for i in range(n)], ["train"] * n, [0] * n
    key = cache.CacheKey("efficientnet_lite0", "bench", 224, "lite:(x-127)/128")
    tracemalloc.start()
    start = time.perf_counter()
    given = np.stack(features).astype(np.float32) if side == "stacked" else features
    cache_writer.write_cache(Path(out), key, given, labels, paths, split, zeros, zeros, ["c"], [], {})
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    same = bool(np.array_equal(cache.load(out).features, np.stack(features)))
    return {"peak_traced_mb": peak, "rows_mb": n * d * 4 / 2**20, "seconds": seconds, "same_features": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=1280)
    args = parse_bench_args(parser, _child)
    if args is None:
        return
    command = bench_command()
    report: dict = {"command": command}
    with tempfile.TemporaryDirectory() as tmp:
        for side in SIDES:
            report[side] = run_isolated(__file__, side, str(args.rows), str(args.dim), str(Path(tmp) / f"{side}.h5"))
    rows, stacked = report["rows"], report["stacked"]
    print(f"final write of {args.rows} x {args.dim} float32 rows ({rows['rows_mb']:.0f} MB): traced peak "
          f"{rows['peak_traced_mb']:.0f} MB as rows vs {stacked['peak_traced_mb']:.0f} MB stacked first "
          f"({stacked['peak_traced_mb'] / rows['peak_traced_mb']:.0f}x); {rows['seconds']:.2f} s vs "
          f"{stacked['seconds']:.2f} s; same features: {rows['same_features'] and stacked['same_features']}")
    finish_report(command, report, args.json)


if __name__ == "__main__":
    main()
