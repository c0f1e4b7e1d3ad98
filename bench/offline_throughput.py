"""Extraction throughput of the offline backbones at several sizes, with and without --tta flip, interleaved.

Usage:
    python bench/offline_throughput.py [--data ../shared/data/scene15] [--sample 160] [--rounds 3]
        [--members efficientnet_lite0:224 efficientnet_lite2:320:flip ...] [--json OUT]

Every member's model is built first; then each round times every member in turn
on the same --sample Scene15 images (spread over the classes), decoding and
preprocessing included, exactly as extraction runs them (one batch of warm-up
first). Interleaving the members round by round keeps a busy machine's drift
out of the ratios: each member's median images/s is reported with its ratio to
the first member's, measured in the same rounds. Full-dataset seconds are
4,485 / that rate, at this machine's load.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from statistics import median

from isolated import bench_command, finish_report

from tlfeat.apps.recipe_book import Member
from tlfeat.backbones import get_backbone
from tlfeat.data.scan import scan_dataset
from tlfeat.runtime import FeatureExtractor, map_batches

REPO = Path(__file__).resolve().parents[1]
SCENE15_IMAGES = 4485
DEFAULT_MEMBERS = [
    f"efficientnet_lite{n}:{size}{tta}"
    for tta in ("", ":flip")
    for n, size in ((0, 224), (1, 240), (2, 260), (0, 288), (1, 300), (2, 320))
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "scene15")
    parser.add_argument("--sample", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--members", nargs="+", default=DEFAULT_MEMBERS)
    parser.add_argument("--json", type=Path, help="also write the report to this file as JSON")
    args = parser.parse_args()

    scan = scan_dataset(args.data)
    stride = max(1, len(scan.entries) // args.sample)
    files = [scan.root / e.relpath for e in scan.entries[::stride][: args.sample]]
    members = [Member.parse(m) for m in args.members]
    extractors = []
    for member in members:
        extractor = FeatureExtractor(get_backbone(member.backbone), "imagenet", member.image_size, tta=member.tta)
        warm_up = files[: extractor.batch_size]
        for _ in map_batches(warm_up, member.image_size, extractor.batch_size, extractor.submit):
            pass  # warm-up: the first call traces the model
        extractors.append((member, extractor))
    rates: dict[str, list[float]] = {m.label: [] for m in members}
    for _ in range(args.rounds):
        for member, extractor in extractors:
            started = time.perf_counter()
            for _ in map_batches(files, member.image_size, extractor.batch_size, extractor.submit):
                pass
            rates[member.label].append(len(files) / (time.perf_counter() - started))
    base = median(rates[members[0].label])
    rows = []
    print("| member | img/s (median) | x first | Scene15 s at this rate |\n|---|---|---|---|")
    for member in members:
        rate = median(rates[member.label])
        rows.append({"member": member.label, "images_per_s": rate, "ratio": rate / base, "runs": rates[member.label]})
        print(f"| {member.label} | {rate:.1f} | {rate / base:.2f}x | {SCENE15_IMAGES / rate:.0f} |")
    finish_report(bench_command(), {"sample": len(files), "rounds": args.rounds, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
