"""Export of a cache to Parquet (and .npy + CSV): seconds, peak RSS, and a read back that equals the cache.

Usage:
    python bench/export_scale.py [--cache cache/scene15-efficientnet_lite0.h5] [--rows 1000000] [--dim 1280]
        [--formats parquet npy] [--root DIR]

Exports each cache given with --cache, and a synthetic cache of --rows random
`dim`-d rows (written a chunk at a time first, not measured), each export in its
own fresh process: seconds, MB/s of features, and the whole process's peak RSS
(``ru_maxrss``, Python, h5py and pyarrow included). Then, in another fresh
process, reads the export back (pyarrow for Parquet, numpy and csv for npy) and
compares every row with the cache: with `tlfeat.load` whole for caches under
--load-limit rows, else with the same rows read a chunk at a time
(`CacheReader.rows`, the reading `load` does, in pieces). Files live under ROOT
(a temporary folder by default) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import csv
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from isolated import bench_command, finish_report, parse_bench_args, run_isolated

CHECK_ROWS = 65536


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synthetic(path: str, rows: str, dim: str) -> dict:
    import numpy as np

    from tlfeat.cache import WRITE_CHUNK_ROWS, CacheKey
    from tlfeat.cache_writer import CacheWriter

    n, d = int(rows), int(dim)
    start = time.perf_counter()
    key = CacheKey("efficientnet_lite0", "bench", 224, "lite:(x-127)/128")
    with CacheWriter(Path(path), key, n, d) as writer:
        for first in range(0, n, WRITE_CHUNK_ROWS):
            k = min(WRITE_CHUNK_ROWS, n - first)
            index = np.arange(first, first + k)
            writer.append(np.random.default_rng(first).standard_normal((k, d), dtype=np.float32), index % 100,
                          [f"c{i % 100:02d}/img_{i:08d}.png" for i in index], ["train"] * k, [1000] * k, [0] * k)
        writer.commit([f"c{c:02d}" for c in range(100)], [], {"seed": 0})
    return {"seconds": time.perf_counter() - start}


def _export(cache: str, fmt: str, out: str) -> dict:
    from tlfeat.apps.export import export

    start = time.perf_counter()
    summary = export(cache, fmt, out)
    return {"rows": summary.n_rows, "dim": summary.feature_dim, "files": len(summary.files),
            "seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(),
            "bytes": sum(f.stat().st_size for f in summary.files)}


def _exported(fmt: str, out: Path) -> Iterator[tuple[list, list, list, object]]:
    """(paths, labels, split, features) of the export, a piece at a time."""
    import numpy as np

    if fmt == "parquet":
        import pyarrow.parquet as pq

        for part in sorted(out.glob("part-*.parquet")):
            handle = pq.ParquetFile(part)
            dim = handle.schema_arrow.field("features").type.list_size
            for group in range(handle.num_row_groups):
                table = handle.read_row_group(group)
                features = table.column("features").combine_chunks().flatten().to_numpy().reshape(-1, dim)
                yield (table.column("path").to_pylist(), table.column("label").to_pylist(),
                       table.column("split").to_pylist(), features)
    else:
        features = np.load(out / "features.npy", mmap_mode="r")
        with open(out / "rows.csv", newline="", encoding="utf-8") as handle:
            rows = csv.DictReader(handle)
            start = 0
            while True:
                piece = [row for _, row in zip(range(CHECK_ROWS), rows)]
                if not piece:
                    return
                yield ([r["path"] for r in piece], [int(r["label"]) for r in piece], [r["split"] for r in piece],
                       np.asarray(features[start : start + len(piece)]))
                start += len(piece)


def _check(cache: str, fmt: str, out: str, load_limit: str) -> dict:
    import numpy as np

    from tlfeat.cache import CacheReader, load

    start = time.perf_counter()
    with CacheReader(cache) as reader:
        whole = load(cache) if reader.n_rows <= int(load_limit) else None
        position = 0
        for paths, labels, split, features in _exported(fmt, Path(out)):
            stop = position + len(paths)
            expected = whole if whole is not None else reader.rows(position, stop)
            offset = position if whole is not None else 0
            same = (list(expected.paths[offset : offset + len(paths)]) == paths
                    and expected.labels[offset : offset + len(paths)].tolist() == labels
                    and list(expected.split[offset : offset + len(paths)]) == split
                    and np.array_equal(expected.features[offset : offset + len(paths)], features))
            if not same:
                return {"same": False, "at_row": position}
            position = stop
        return {"same": position == reader.n_rows, "rows": position, "compared_with": "load" if whole is not None
                else "CacheReader.rows", "seconds": time.perf_counter() - start}


def _child(kind: str, *args: str) -> dict:
    return {"synthetic": _synthetic, "export": _export, "check": _check}[kind](*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, nargs="*", default=[], help="existing caches to export")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the synthetic cache (0: none)")
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--formats", nargs="+", default=["parquet"], choices=["parquet", "npy"])
    parser.add_argument("--load-limit", type=int, default=200_000, help="compare with tlfeat.load up to this many rows")
    parser.add_argument("--root", type=Path, help="where the synthetic cache and the exports go")
    args = parse_bench_args(parser, _child)
    if args is None:
        return
    command = bench_command()
    root = args.root or Path(tempfile.mkdtemp(prefix="tlfeat-export-"))
    report: dict = {"command": command, "exports": []}
    try:
        caches = list(args.cache)
        if args.rows:
            synthetic = root / f"synthetic-{args.rows}.h5"
            made = run_isolated(__file__, "synthetic", str(synthetic), str(args.rows), str(args.dim))
            print(f"synthetic cache of {args.rows} x {args.dim} written in {made['seconds']:.0f} s", flush=True)
            caches.append(synthetic)
        for cache in caches:
            for fmt in args.formats:
                out = root / f"{cache.stem}-{fmt}"
                result = run_isolated(__file__, "export", str(cache), fmt, str(out))
                result.update(cache=str(cache), format=fmt,
                              check=run_isolated(__file__, "check", str(cache), fmt, str(out), str(args.load_limit)))
                report["exports"].append(result)
                mb = result["rows"] * result["dim"] * 4 / 2**20
                print(f"{cache.name} -> {fmt}: {result['rows']} rows x {result['dim']} ({mb:.0f} MB of features) in "
                      f"{result['files']} files, {result['seconds']:.1f} s ({mb / result['seconds']:.0f} MB/s), "
                      f"peak RSS {result['peak_rss_mb']:.0f} MB; read back equals the cache "
                      f"({result['check'].get('compared_with')}): {result['check']['same']}", flush=True)
                shutil.rmtree(out)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    finish_report(command, report, args.json)


if __name__ == "__main__":
    main()
