"""Are audit's near-duplicate pairs all the pairs? Its search against brute force, in one run.

Usage:
    python bench/audit_pairs.py --cache CACHE.h5 [--thresholds 0.94 0.9 0.8] [--json]

For each threshold, `tlfeat.analysis.find_duplicates` (exact search, NEIGHBOURS per row
first, rows whose last neighbour still reaches the threshold searched again with more)
and a brute-force float64 all-pairs cosine matrix of the same cache give their pairs at
or above it (byte-identical files are left out of both: only embeddings are compared
here). Printed: pairs found by each, missing and extra, and the search's seconds. The
all-pairs matrix is N x N float64: keep N to a few tens of thousands.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from tlfeat.analysis.common import open_cache
from tlfeat.analysis.duplicates import find_duplicates


def brute_force_pairs(features: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-30)
    sims = unit @ unit.T
    upper = np.triu_indices(len(unit), 1)
    keep = sims[upper] >= threshold
    return set(zip(upper[0][keep].tolist(), upper[1][keep].tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.94, 0.9, 0.8])
    parser.add_argument("--json", action="store_true", help="one JSON object per threshold")
    args = parser.parse_args()
    with open_cache(args.cache) as (data, stored):
        features = np.asarray(stored[:], dtype=np.float64)
        for threshold in args.thresholds:
            started = time.perf_counter()
            found = find_duplicates(data, stored, args.cache, threshold=threshold, index="exact")
            seconds = time.perf_counter() - started
            searched = {(p.a, p.b) if p.a < p.b else (p.b, p.a) for p in found.pairs
                        if p.similarity >= threshold}  # byte-identical pairs below it are not compared
            brute = brute_force_pairs(features, threshold)
            result = {"cache": str(args.cache), "rows": len(data), "threshold": threshold,
                      "search_pairs": len(searched), "brute_force_pairs": len(brute),
                      "missing": len(brute - searched), "extra": len(searched - brute),
                      "search_seconds": round(seconds, 2), "notes": found.notes}
            print(json.dumps(result) if args.json else
                  f"threshold {threshold}: search {len(searched)} pairs, brute force {len(brute)}, missing "
                  f"{result['missing']}, extra {result['extra']}; search {seconds:.2f} s"
                  + "".join(f"\n  note: {note}" for note in found.notes))


if __name__ == "__main__":
    main()
