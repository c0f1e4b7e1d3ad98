"""How far the per-class split counts of Scene15 stray from the ratios (the split is per image, not per class).

Usage:
    python bench/split_deviation.py [--data ../shared/data/scene15] [--seeds 100]

tlfeat gives each image its split from (relative path, seed, ratios) alone, so
counts per class follow the ratios only up to binomial noise. This prints, for
seed 0 and over `--seeds` seeds, the per-class deviation from the expected count
in two settings: Scene15 as it is (pre-split; val carved from each class's 100
train images at 25%), and Scene15's 4,485 images taken as one flat set split
56.25/18.75/25. Counts only; nothing is timed and nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from pathlib import Path

from tlfeat.data.scan import DEFAULT_RATIOS, SPLITS, scan_dataset, split_of


def _deviations(counts: Counter, totals: Counter, shares: dict[str, float]) -> list[tuple[float, float]]:
    """(count - expected, in images; drawn share - share, in percentage points) for every (class, split)."""
    return [
        (counts[(c, s)] - totals[c] * share, 100 * (counts[(c, s)] / totals[c] - share))
        for c in totals for s, share in shares.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "scene15")
    parser.add_argument("--seeds", type=int, default=100)
    args = parser.parse_args()

    train, val, test = DEFAULT_RATIOS
    carve = val / (train + val)
    settings = {
        "pre-split (val carved from train/, 25%)": {"val": carve},
        "flat (all images, 56.25/18.75/25)": dict(zip(SPLITS, DEFAULT_RATIOS)),
    }
    for title, shares in settings.items():
        worst, mean_abs = [], []
        for seed in range(args.seeds):
            scan = scan_dataset(args.data, seed=seed)
            if "val" in shares and len(shares) == 1:
                pool = [e for e in scan.entries if e.split in ("train", "val")]
                counts = Counter((e.class_name, e.split) for e in pool)
            else:
                pool = scan.entries
                counts = Counter((e.class_name, split_of(e.relpath, seed, DEFAULT_RATIOS)) for e in pool)
            totals = Counter(e.class_name for e in pool)
            dev = _deviations(counts, totals, shares)
            worst.append((max(abs(d) for d, _ in dev), max(abs(p) for _, p in dev)))
            mean_abs.append((statistics.fmean(abs(d) for d, _ in dev), statistics.fmean(abs(p) for _, p in dev)))
            if seed == 0:
                print(f"{title}: {len(totals)} classes, {len(pool)} images")
                for s in shares:
                    values = sorted(counts[(c, s)] for c in totals)
                    print(f"  seed 0, {s}: per-class counts {values[0]}..{values[-1]}")
                print(
                    f"  seed 0: mean |count - expected| {mean_abs[0][0]:.2f} images ({mean_abs[0][1]:.2f} points of "
                    f"share), largest {worst[0][0]:.1f} images ({worst[0][1]:.2f} points)"
                )
        print(
            f"  seeds 0..{args.seeds - 1}: mean |count - expected| {statistics.fmean(m for m, _ in mean_abs):.2f} "
            f"images ({statistics.fmean(p for _, p in mean_abs):.2f} points); largest per seed: median "
            f"{statistics.median(w for w, _ in worst):.1f} images, max {max(w for w, _ in worst):.1f} images "
            f"({max(p for _, p in worst):.2f} points)"
        )


if __name__ == "__main__":
    main()
