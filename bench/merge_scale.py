"""Extraction's driver at scale, without a model or images: peak RSS and seconds of each step.

Usage:
    python bench/merge_scale.py [--rows 100000 1000000] [--dim 1280] [--batch 256] [--grow 0.01] [--rate 15000]
                                [--root DIR] [--trace]

For each size N: synthetic shards of N random `dim`-d rows (batches of `batch`
rows, as an interrupted run leaves them) are written first (not measured); then,
each in its own fresh process, `tlfeat.extraction.run.extract` runs with two
stand-ins:

* the scan: a generated description of N files in canonical order (100 class
  folders, splits in thirds) replaces `scan_dataset`, whose own cost at a million
  files is `bench/scan_scale.py`'s;
* the engine: rows of random features, and no Keras (`keras_backend` answers
  "bench"), so the process holds only what the driver holds.

Steps:

* ``fresh N`` (smallest N only): nothing on disk yet; the engine computes every
  row at `rate` images/s (a device's pace) and the final file is written while it
  does; its tail (last batch to finished file) is compared with ``merge N``, the
  time to write the same file from shards alone, which is what the tail was when
  the final write followed the compute;
* ``merge N``: the resumed run: every row is in the shards; the final file is
  gathered from them;
* ``grow N`` (largest N only): the dataset grows by `grow` (new files between
  the old ones); the run computes the new rows and merges them with the N rows
  of the cache;
* ``rerun N`` (largest N only): the same dataset again: up to date, nothing written.

Peak RSS is the whole process's, as the OS counts it (``ru_maxrss``), Python and
its libraries included. Every cache is checked: rows in canonical order, and a
sample of rows (each shard's first) equal to the features the shards were made with.
Files live under ROOT (a temporary folder by default) and are deleted at the end.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from isolated import bench_command, finish_report, parse_bench_args, run_isolated

CLASSES = 100
SPLIT_NAMES = ("train", "val", "test")
WEIGHTS_ID = "none:stand-in"  # the stand-in engine's "weights": no model, no Keras
BACKBONE = "efficientnet_lite0"  # 1280-d, like the figures; only its name and key are used


class Files:
    """N generated files in canonical order (split, class, path), as `scan_dataset` would list them.

    Every `every`-th file of each (split, class) group is one that `grow` adds ("...a.png", which sorts
    after the file before it); `every=0` leaves them out.
    """

    def __init__(self, n: int, every: int = 0) -> None:
        self.group = -(-n // (len(SPLIT_NAMES) * CLASSES))  # old files per (split, class)
        self.every = every
        self.size = self.group + (self.group // (every - 1) if every else 0)
        self.n = self.size * len(SPLIT_NAMES) * CLASSES

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        from tlfeat.data.scan import ImageEntry

        if not 0 <= i < self.n:
            raise IndexError(i)
        group, k = divmod(i, self.size)
        split, class_index = divmod(group, CLASSES)
        added = False
        if self.every:
            block, rest = divmod(k, self.every)
            added = rest == self.every - 1
            k = block * (self.every - 1) + (rest - 1 if added else rest)
        name = f"c{class_index:02d}/{SPLIT_NAMES[split]}{k:08d}{'a' if added else ''}.png"
        return ImageEntry(name, f"c{class_index:02d}", SPLIT_NAMES[split], 1000 + k, 1_700_000_000 * 10**9 + k)

    def table(self) -> Any:
        """The files as the `ImageTable` a scan keeps (its memory counts, as in a real run)."""
        from tlfeat.data.entries import ImageTable

        table = ImageTable([f"c{c:02d}" for c in range(CLASSES)])
        for i in range(self.n):
            entry = self[i]
            table.append(entry.relpath, int(entry.class_name[1:]), SPLIT_NAMES.index(entry.split), entry.size,
                         entry.mtime_ns)
        return table

    def old_count(self) -> int:
        return self.group * len(SPLIT_NAMES) * CLASSES

    def position_of_old(self, j: int) -> int:
        """Where the j-th file of the dataset before growth stands in this one."""
        group, k = divmod(j, self.group)
        if self.every:
            block, rest = divmod(k, self.every - 1)
            k = block * self.every + rest
        return group * self.size + k


def _features(seed: int, rows: int, dim: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)


def _key(dim: int) -> Any:
    from tlfeat.backbones import get_backbone
    from tlfeat.cache import CacheKey

    spec = get_backbone(BACKBONE)
    assert spec.feature_dim == dim, f"--dim {dim}: {BACKBONE} is {spec.feature_dim}-d"
    return CacheKey(spec.name, WEIGHTS_ID, 32, spec.preprocessing, "float32", "float32")


def _write_shards(root: str, n: str, dim: str, batch: str) -> dict:
    from tlfeat.extraction.shards import ShardStore
    from tlfeat.extraction.engines import batch_rows

    files, d, b = Files(int(n)), int(dim), int(batch)
    start = time.perf_counter()
    shards = ShardStore(Path(root) / "cache.h5")
    shards.start(_key(d))
    for first in range(0, len(files), b):
        entries = [files[i] for i in range(first, min(first + b, len(files)))]
        shards.write(batch_rows(entries, _features(first, len(entries), d), range(len(entries)), []))
    return {"rows": len(files), "seconds": time.perf_counter() - start}


class StandInEngine:
    """Random rows for every file it is given, batch by batch (the seed: the batch's first entry index).

    With `rate` (images/s), batches come no faster than a device computing at that rate would give them.
    """

    compute = "float32"

    def __init__(self, dim: int, batch: int, rate: float = 0.0) -> None:
        self.dim, self.batch, self.rate = dim, batch, rate
        self.last_batch_at = 0.0  # when the last batch was handed over

    def __enter__(self) -> "StandInEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def load(self) -> None:
        pass  # no model to load

    def keras_backend(self) -> str:
        return "bench"

    def embed(self, root: Path, todo: list, bar: Any) -> Iterator[Any]:
        from tlfeat.extraction.engines import batch_rows

        start = time.perf_counter()
        for first in range(0, len(todo), self.batch):
            entries = todo[first : first + self.batch]
            rows = batch_rows(entries, _features(10**9 + first, len(entries), self.dim), range(len(entries)), [])
            if self.rate:
                time.sleep(max(0.0, start + (first + len(entries)) / self.rate - time.perf_counter()))
            self.last_batch_at = time.perf_counter()
            yield rows


class TracedPeak:
    """Python's allocations (numpy arrays among them) at the highest traced total seen, by the place in
    tlfeat or this bench that made them; polled, so a short-lived peak may be missed."""

    def __init__(self) -> None:
        import threading
        import tracemalloc

        self.tracemalloc, self.best, self.snapshot = tracemalloc, 0, None
        tracemalloc.start(8)
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            current = self.tracemalloc.get_traced_memory()[0]
            if current > self.best + (1 << 19):
                self.best, self.snapshot = current, self.tracemalloc.take_snapshot()
            time.sleep(0.05)

    def report(self, top: int = 8) -> dict:
        sites: dict[str, int] = {}
        for stat in self.snapshot.statistics("traceback") if self.snapshot else []:
            ours = [f for f in reversed(stat.traceback) if "/tlfeat/" in f.filename or "merge_scale" in f.filename]
            frame = ours[0] if ours else stat.traceback[-1]
            site = f"{frame.filename.split('/tlfeat/')[-1].split('/')[-1]}:{frame.lineno}"
            sites[site] = sites.get(site, 0) + stat.size
        largest = sorted(sites.items(), key=lambda item: -item[1])[:top]
        return {"traced_peak_mb": self.best / 2**20, "traced_sites_mb": [[s, b / 2**20] for s, b in largest]}


def _run(root: str, n: str, every: str, dim: str, batch: str, rate: str = "0", trace: str = "0") -> dict:
    import numpy as np

    import tlfeat.extraction.run as run_module
    from tlfeat.cache import CacheReader
    from tlfeat.data.scan import DatasetScan

    files = Files(int(n), int(every))
    # The files are never read: any folder beside the cache (not around it: nothing is written in a dataset).
    scan = DatasetScan(Path(root) / "data", "flat", [f"c{c:02d}" for c in range(CLASSES)], files.table())
    run_module.scan_dataset = lambda data, seed, ratios: scan
    engine = StandInEngine(int(dim), int(batch), float(rate))
    run_module.make_engine = lambda *args, **kwargs: engine
    # Random weights are named with the Keras backend, which would load Keras (~700 MB) into the driver measured.
    run_module.weights_identity = lambda spec, weights: WEIGHTS_ID
    traced = TracedPeak() if trace == "1" else None
    start = time.perf_counter()
    summary = run_module.extract(root, Path(root) / "cache.h5", backbone=BACKBONE, weights="none", image_size=32,
                                 progress=False)
    end = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    traced_report = traced.report() if traced else {}
    with CacheReader(Path(root) / "cache.h5") as cache:  # checked after the peak is taken
        assert cache.n_rows == len(files)
        fresh = summary.n_computed == len(files)
        for shard in range(0, files.old_count(), int(batch) * max(1, files.old_count() // int(batch) // 50)):
            position = files.position_of_old(shard)  # the first row of a shard (or, fresh, of a batch)
            row = cache.rows(position, position + 1)
            assert row.paths[0] == files[position].relpath
            seed = 10**9 + shard if fresh else shard
            assert np.array_equal(row.features[0], _features(seed, 1, int(dim))[0]), position
    computed = {"tail_seconds": end - engine.last_batch_at} if summary.n_computed else {}
    return {"rows": len(files), "computed": summary.n_computed, "reused": summary.n_reused,
            "up_to_date": summary.up_to_date, "seconds": end - start, "peak_rss_mb": peak, **computed, **traced_report}


def _child(kind: str, *args: str) -> dict:
    return _write_shards(*args) if kind == "shards" else _run(*args)


def _step(report: dict, folder: Path, name: str, n: int, growth: str, args: argparse.Namespace) -> None:
    rate = "0" if name in ("merge", "rerun") else str(args.rate)
    result = run_isolated(__file__, name, str(folder), str(n), growth, str(args.dim), str(args.batch), rate,
                          "1" if args.trace else "0")
    report["steps"].append({"step": f"{name} {n}", **result})
    tail = f", {result['tail_seconds']:.2f} s after the last batch" if "tail_seconds" in result else ""
    print(f"{name} {n}: {result['rows']} rows (computed {result['computed']}, reused "
          f"{result['reused']}{', up to date' if result['up_to_date'] else ''}): "
          f"{result['seconds']:.1f} s{tail}, peak RSS {result['peak_rss_mb']:.0f} MB", flush=True)
    if "traced_peak_mb" in result:
        sites = ", ".join(f"{site} {mb:.1f}" for site, mb in result["traced_sites_mb"])
        print(f"  traced by Python at its peak: {result['traced_peak_mb']:.1f} MB; largest (MB): {sites}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=256, help="rows per shard (the engine's batch)")
    parser.add_argument("--grow", type=float, default=0.01, help="share of new files in the growth step")
    parser.add_argument("--rate", type=float, default=15000.0,
                        help="images/s of the stand-in engine where it computes (fresh and grow steps): a device's pace")
    parser.add_argument("--root", type=Path, help="where the shards and caches go (default: a temporary folder)")
    parser.add_argument("--trace", action="store_true",
                        help="also trace Python's allocations (slow: use with --rows of 300,000 at most) and print, "
                             "at the traced peak of each step, the places holding the most")
    args = parse_bench_args(parser, _child)
    if args is None:
        return
    command = bench_command()
    root = args.root or Path(tempfile.mkdtemp(prefix="tlfeat-merge-"))
    every = str(round(1 / args.grow) + 1)  # one new file after each 1/grow old ones
    report: dict = {"command": command, "dim": args.dim, "batch": args.batch, "rate": args.rate, "steps": []}
    try:
        for n in args.rows:
            folder = root / str(n)
            folder.mkdir(parents=True, exist_ok=True)
            if n == min(args.rows):
                _step(report, folder, "fresh", n, "0", args)
                (folder / "cache.h5").unlink()
            made = run_isolated(__file__, "shards", str(folder), str(n), str(args.dim), str(args.batch))
            print(f"{made['rows']} rows of shards written in {made['seconds']:.0f} s", flush=True)
            _step(report, folder, "merge", n, "0", args)
            if n == max(args.rows):
                _step(report, folder, "grow", n, every, args)
                _step(report, folder, "rerun", n, every, args)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    peaks = {s["step"]: s["peak_rss_mb"] for s in report["steps"]}
    small, large = min(args.rows), max(args.rows)
    fresh, merge = (next(s for s in report["steps"] if s["step"] == f"{kind} {small}") for kind in ("fresh", "merge"))
    print(f"fresh {small}: {fresh['tail_seconds']:.2f} s from the last batch to the finished file, against "
          f"{merge['seconds']:.2f} s to write the same file from shards alone (merge {small}): "
          f"{fresh['tail_seconds'] / merge['seconds']:.2f}x")
    if small != large:
        print(f"peak RSS, merge {large} / merge {small}: {peaks[f'merge {large}'] / peaks[f'merge {small}']:.2f}x; "
              f"grow {large} / merge {small}: {peaks[f'grow {large}'] / peaks[f'merge {small}']:.2f}x")
    finish_report(command, report, args.json)


if __name__ == "__main__":
    main()
