"""The cost of writing the cache through FirstErrorSink (h5py's file-object driver) instead of by path.

Usage:
    python bench/cache_sink.py [--rows 20000] [--dim 1280] [--repeats 3] [--json OUT]

`tlfeat.cache_writer.write_cache` hands HDF5 a Python file object that keeps the first
write error (a full disk) instead of raising it inside HDF5, which used to leave
the library in a state that segfaulted the interpreter. This times the same
features dataset (chunks of 1,024 rows, fletcher32 checksums) written through
that sink and by path (HDF5's own sec2 driver), each write in its own process,
the two sides alternating; medians, and the ratio sink / path.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from isolated import bench_command, finish_report, parse_bench_args, run_isolated

SIDES = ("path", "sink")


def _child(side: str, rows: str, dim: str, out: str) -> dict:
    import h5py
    import numpy as np

    from tlfeat.fileio import FirstErrorSink

    n, d = int(rows), int(dim)
    data = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)

    def write(target: object) -> None:
        with h5py.File(target, "w") as handle:
            stored = handle.create_dataset("features", shape=(n, d), dtype="float32", chunks=(1024, d),
                                           fletcher32=True)
            for start in range(0, n, 1024):
                stored[start : start + 1024] = data[start : start + 1024]

    start = time.perf_counter()
    if side == "sink":
        with open(out, "wb+", buffering=0) as raw:
            sink = FirstErrorSink(raw)
            write(sink)
            assert sink.error is None
    else:
        write(out)
    seconds = time.perf_counter() - start
    with h5py.File(out, "r") as handle:
        same = bool(np.array_equal(handle["features"][...], data))
    return {"seconds": seconds, "same_features": same, "mb": n * d * 4 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_bench_args(parser, _child)
    if args is None:
        return
    command = bench_command()
    report: dict = {"command": command, **{side: [] for side in SIDES}}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for side in SIDES:
                out = str(Path(tmp) / f"{side}.h5")
                report[side].append(run_isolated(__file__, side, str(args.rows), str(args.dim), out))
    median = {side: statistics.median(r["seconds"] for r in report[side]) for side in SIDES}
    same = all(r["same_features"] for side in SIDES for r in report[side])
    print(f"write of {args.rows} x {args.dim} float32 ({report['path'][0]['mb']:.0f} MB), median of {args.repeats}: "
          f"sink {median['sink']:.2f} s vs path {median['path']:.2f} s ({median['sink'] / median['path']:.2f}x); "
          f"same features: {same}")
    finish_report(command, report, args.json)


if __name__ == "__main__":
    main()
