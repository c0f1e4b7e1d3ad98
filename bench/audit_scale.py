"""Analyses at scale: audit, exact top-10 search for 1,000 queries, faiss index build and search, peak memory.

Usage:
    python bench/audit_scale.py --cache /tmp/i18/scene15-lite0.h5 [--json OUT]
    python bench/audit_scale.py --synthetic 1000000 --work /tmp/i18/bench [--json OUT]

--synthetic N writes an N x 1280 float32 cache into --work: 15 classes, each of
200 sub-clusters in a 256-d subspace with a decaying spectrum, made non-negative
like pooled CNN features (isotropic gaussian blobs would leave faiss's IVF cells
badly unbalanced, unlike real embeddings); with planted cases to check what audit
finds at that size: every 1,024th row has a perturbed copy (cosine ~0.999) in the
test split, and every 1,000th row's label is moved to the next class.

Each measurement runs in a fresh process (bench/isolated.py): wall seconds of the
call and the process's peak resident memory (ru_maxrss: numpy, faiss and BLAS
buffers all count), next to its resident memory just before the call (imports).
Baselines in the same run: one pass reading every feature block (`scan`, what
every streaming analysis pays at least once) for audit; exact blocked search for
faiss (whose recall@10 against it is given). faiss-search is what `similar
--index faiss` does: twice the candidates from the index, re-scored exactly.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from isolated import bench_command, finish_report, parse_bench_args, run_isolated

N_QUERIES = 1000
TOP = 10
CLASSES = 15
DIM = 1280
RANK, SUBCLUSTERS = 256, 200
COPY_EVERY = 1024  # one planted copy per write chunk: row start -> row start + 3 (train -> test)
FLIP_EVERY = 1000


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:")) / 1024


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SyntheticRows:
    """N rows of D features made a write chunk at a time (never all in memory), reproducibly."""

    def __init__(self, n: int) -> None:
        self.n = n
        rng = np.random.default_rng(0)
        self.centres = (rng.uniform(0, 1, size=(CLASSES, DIM)) ** 3).astype(np.float32)
        self.basis = np.linalg.qr(rng.normal(size=(DIM, RANK)))[0].astype(np.float32)
        self.scales = (4.0 * np.arange(1, RANK + 1) ** -0.5).astype(np.float32)
        self.subclusters = rng.normal(size=(CLASSES * SUBCLUSTERS, RANK)).astype(np.float32) * self.scales

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int | slice) -> np.ndarray:
        if isinstance(key, int):
            return self[key : key + 1][0]
        start, stop = key.start or 0, min(key.stop, self.n)
        rng = np.random.default_rng([1, start])
        classes = np.arange(start, stop) % CLASSES
        sub = classes * SUBCLUSTERS + rng.integers(0, SUBCLUSTERS, len(classes))
        latent = self.subclusters[sub] + 0.8 * rng.normal(size=(len(classes), RANK)).astype(np.float32) * self.scales
        noise = rng.normal(0, 0.1, (len(classes), DIM)).astype(np.float32)
        block = np.abs(self.centres[classes] + latent @ self.basis.T + noise)
        if start % COPY_EVERY == 0 and len(classes) > 3:
            block[3] = np.abs(block[0] + rng.normal(0, 0.02, DIM).astype(np.float32))
        return block


def _split(n: int) -> np.ndarray:
    return np.array(["train", "train", "val", "test"], dtype=object)[np.arange(n) % 4]


def _labels(n: int) -> np.ndarray:
    labels = np.arange(n) % CLASSES
    flipped = np.arange(0, n, FLIP_EVERY) + 1  # never a planted copy's row
    labels[flipped] = (labels[flipped] + 1) % CLASSES
    return labels


def make_synthetic(path: Path, n: int) -> None:
    from tlfeat.cache import CacheKey
    from tlfeat.cache_writer import write_cache

    split = _split(n)
    write_cache(
        path, CacheKey("synthetic", "none", 224, "synthetic"), features=SyntheticRows(n), labels=_labels(n),
        paths=[f"c{r % CLASSES:02d}/img_{r:07d}.png" for r in range(n)], split=list(split),
        file_size=[1] * n, file_mtime_ns=[0] * n, class_names=[f"c{c:02d}" for c in range(CLASSES)],
        skipped=[], extra_attrs={"dataset_root": str(path.parent / "no-images"), "seed": 0},
    )


def _queries(cache: str) -> np.ndarray:
    from tlfeat.analysis.common import open_cache

    with open_cache(cache) as (data, features):
        return features.rows(np.random.default_rng(0).choice(len(data), size=min(N_QUERIES, len(data)), replace=False))


def _child(kind: str, cache: str, work: str) -> dict:
    from tlfeat.analysis.common import open_cache
    from tlfeat.analysis.search import exact_top_k, index_top_k, open_index, rescore

    if kind == "make":
        make_synthetic(Path(cache), int(work))
        return {}
    queries = _queries(cache) if kind in ("exact", "faiss-search") else None
    before = _rss_mb()
    start = time.perf_counter()
    result: dict = {}
    if kind == "scan":
        with open_cache(cache) as (_, features):
            for _ in features.blocks():
                pass
    elif kind == "exact":
        with open_cache(cache) as (_, features):
            found = exact_top_k(queries, features, TOP)
        np.save(Path(work) / "exact.npy", found.indices)
    elif kind == "faiss-build":
        with open_cache(cache) as (_, features):
            open_index(cache, features, rebuild=True)
    elif kind == "faiss-search":
        with open_cache(cache) as (_, features):
            index, built, _ = open_index(cache, features)
            loaded = time.perf_counter()
            found = rescore(queries, index_top_k(index, queries, 2 * TOP, nprobe=16), features, TOP)
        assert not built, "the index should have been built by the faiss-build step"
        exact = np.load(Path(work) / "exact.npy")
        result["search_seconds"] = time.perf_counter() - loaded
        result["recall_at_10"] = float(np.mean([len(set(a) & set(b)) / TOP for a, b in zip(found.indices, exact)]))
    elif kind == "audit":
        from tlfeat.analysis import audit

        found = audit(cache, out=Path(work) / "audit")
        result["stages"] = found.seconds
        result["pairs"] = {k: found.duplicates.count(k) for k in ("test leak", "cross-split", "within split")}
        result["threshold"] = found.duplicates.threshold
        result["search"] = found.duplicates.search
        result["flagged"] = int(len(found.labels.flagged)) if found.labels else None
        result["oof_accuracy"] = found.labels.accuracy if found.labels else None
        if found.data.attrs.get("backbone") == "synthetic":
            n = len(found.data)
            planted = {(r, r + 3) for r in range(0, n - 3, COPY_EVERY)}
            result["planted_copies_found"] = len(planted & {(p.a, p.b) for p in found.duplicates.pairs}) / len(planted)
            flipped = set(range(1, n, FLIP_EVERY))
            top = set(found.labels.order[: 2 * len(flipped)].tolist())
            result["planted_flips_in_top_2x"] = len(flipped & top) / len(flipped)
    result.update(seconds=time.perf_counter() - start, rss_before_mb=before, peak_rss_mb=_peak_mb())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="an existing cache (e.g. Scene15's)")
    parser.add_argument("--synthetic", type=int, help="write and use a synthetic cache of this many rows")
    parser.add_argument("--work", type=Path, help="folder for the synthetic cache, its index and audit output")
    args = parse_bench_args(parser, _child)
    if args is None:
        return
    if (args.cache is None) == (args.synthetic is None):
        raise SystemExit("give --cache CACHE.h5 or --synthetic N --work DIR")
    command = bench_command()
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        cache = args.cache
        if args.synthetic:
            cache = Path(tmp) / f"synthetic-{args.synthetic}.h5"
            started = time.perf_counter()
            run_isolated(__file__, "make", str(cache), str(args.synthetic))
            print(f"wrote {cache} ({cache.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f} s",
                  flush=True)
        report: dict = {"command": command, "cpu_count": os.cpu_count(), "cache": str(cache), "steps": {}}
        print("| step | seconds | peak RSS MB (before the call) | notes |")
        print("|---|---|---|---|")
        for kind in ("scan", "exact", "faiss-build", "faiss-search", "audit"):
            step = run_isolated(__file__, kind, str(cache), tmp)
            report["steps"][kind] = step
            notes = {k: v for k, v in step.items() if k not in ("seconds", "rss_before_mb", "peak_rss_mb")}
            print(f"| {kind} | {step['seconds']:.2f} | {step['peak_rss_mb']:.0f} ({step['rss_before_mb']:.0f}) | "
                  f"{notes} |", flush=True)
    steps = report["steps"]
    print(f"\naudit / scan: {steps['audit']['seconds'] / steps['scan']['seconds']:.1f}x; "
          f"faiss search / exact search (1,000 queries, top {TOP}): "
          f"{steps['faiss-search']['search_seconds'] / steps['exact']['seconds']:.3f}x at recall@10 "
          f"{steps['faiss-search']['recall_at_10']:.3f}")
    finish_report(command, report, args.json)


if __name__ == "__main__":
    main()
