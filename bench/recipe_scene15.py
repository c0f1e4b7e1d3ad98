"""Offline backbones on Scene15: extraction cost of each member, test accuracy of each member and fused set.

Usage:
    python bench/recipe_scene15.py [--data ../shared/data/scene15] [--cache-dir /tmp/tlfeat-recipe]
        [--members efficientnet_lite0:224 efficientnet_lite1:300:flip ...] [--combos 0+3 0+1+2 ...]
        [--grid 0.01 0.03 0.1 0.3 1.0] [--rates THROUGHPUT.json] [--json OUT]

Members are BACKBONE:SIZE[:flip]. Each is extracted with `tlfeat.extract.extract` into
the file `tlfeat recipe` would use (local engine, 2 CPUs here), one after another;
a member whose cache exists is reused with the timing recorded beside it
(``<cache>.bench.json``) when it was computed. Throughput is also given as a
ratio to the first member, as both were measured on the same machine by this
script (machine busy: other jobs share its 2 cores, so seconds vary run to run).

Protocol (standard for Scene15): standardized features, multinomial logistic
regression, as `tlfeat recipe` fits it. "cv C" is the C of the grid with the best
5-fold cross-validated accuracy over the 1,500 train images (tlfeat's train and
val splits), refitted on all of them and scored on the 2,985 test images; "C=x"
columns give the cross-validated and the refitted test accuracy at each C, so
the choice can be judged. --combos name fused sets by member index (0+3 = the
first and fourth); every single member is always scored.

--rates takes the JSON report of bench/offline_throughput.py (every member timed
in interleaved rounds on a sample, in one run) and costs each member at that
rate over Scene15's 4,485 images instead of the recorded extraction time: use it
when the recorded times come from runs on a machine with different loads.

Decoding alone (the extraction's own thread pool, no model) is timed on the first
--decode-sample images at each member's size, in this run: its share of the
member's extraction time bounds what decoding each image once for all members
could save.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from isolated import bench_command, finish_report

from tlfeat.apps.recipe import member_cache, select_and_refit
from tlfeat.apps.recipe_book import Member
from tlfeat.data.batches import iter_batches
from tlfeat.data.scan import scan_dataset
from tlfeat.extraction.run import extract
from tlfeat.heads.fit import load_features
from tlfeat.runtime import CPU_BATCH_SIZE

REPO = Path(__file__).resolve().parents[1]
SCENE15_IMAGES = 4485


def extract_timed(data: Path, cache_dir: Path, member: Member) -> dict:
    """Extract (or reuse) one member; its timing from this run, or from the run that computed it."""
    cache = member_cache(data, cache_dir, member)
    record = Path(str(cache) + ".bench.json")
    summary = extract(data, out=cache, backbone=member.backbone, image_size=member.image_size, tta=member.tta,
                      progress=False)
    if summary.n_computed:
        timing = {
            "cache": str(cache), "seconds": summary.seconds, "images_per_s": summary.images_per_s,
            "computed": summary.n_computed, "measured": time.strftime("%Y-%m-%d %H:%M"),
        }
        record.write_text(json.dumps(timing))
        return timing
    if record.exists():
        return json.loads(record.read_text())
    return {"cache": str(cache), "seconds": None, "images_per_s": None, "computed": 0, "measured": None}


def decode_rate(data: Path, size: int, sample: int) -> float:
    """Images per second of decoding and resizing alone, as extraction does it, over the first `sample` images."""
    scan = scan_dataset(data)
    files = [scan.root / e.relpath for e in scan.entries[:sample]]
    started = time.perf_counter()
    for _ in iter_batches(files, size, CPU_BATCH_SIZE):
        pass
    return len(files) / (time.perf_counter() - started)


def score(caches: list[Path], grid: list[float]) -> dict:
    features = load_features(caches)
    chosen = select_and_refit(features, grid)
    at_c = {c: select_and_refit(features, [c]).metrics["test"]["accuracy"] for c in grid}
    return {
        "dim": int(features.data.features.shape[1]),
        "cv_c": chosen.c,
        "cv_at_c": {t["C"]: t["cv_accuracy"] for t in chosen.trials},
        "test_accuracy": chosen.metrics["test"]["accuracy"],
        "test_at_c": at_c,
        "fit_seconds": chosen.fit_seconds + chosen.search_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / ".." / "shared" / "data" / "scene15")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/tlfeat-recipe"))
    parser.add_argument("--members", nargs="+", default=[
        "efficientnet_lite0:224", "efficientnet_lite1:240", "efficientnet_lite2:260",
        "efficientnet_lite0:288", "efficientnet_lite1:300", "efficientnet_lite2:320",
    ])
    parser.add_argument("--combos", nargs="*", default=["0+3", "0+1+2", "3+4+5", "0+1+2+4+5", "0+1+2+3+4+5"])
    parser.add_argument("--grid", nargs="+", type=float, default=[0.01, 0.03, 0.1, 0.3, 1.0])
    parser.add_argument("--decode-sample", type=int, default=600, help="images decoded per size (0: skip)")
    parser.add_argument("--rates", type=Path, help="offline_throughput.py's JSON: cost members at those rates")
    parser.add_argument("--json", type=Path, help="also write the report to this file as JSON")
    args = parser.parse_args()

    members = [Member.parse(m) for m in args.members]
    rates = {}
    if args.rates:
        rates = {row["member"]: row["images_per_s"] for row in json.loads(args.rates.read_text())["rows"]}
    timings = []
    for member in members:
        timing = extract_timed(args.data, args.cache_dir, member)
        if member.label in rates:
            timing = {**timing, "images_per_s": rates[member.label], "seconds": SCENE15_IMAGES / rates[member.label],
                      "measured": f"rate from {args.rates.name}"}
        timings.append(timing)
        rate = timing["images_per_s"]
        print(f"extract {member.label}: " + (f"{timing['seconds']:.0f} s, {rate:.1f} img/s" if rate else "reused"),
              flush=True)
    base_rate = timings[0]["images_per_s"]
    decoding = []
    if args.decode_sample:
        for size in sorted({m.image_size for m in members}):
            rate = decode_rate(args.data, size, args.decode_sample)
            shares = ", ".join(f"{m.label} {t['images_per_s'] / rate:.0%}" for m, t in zip(members, timings)
                               if m.image_size == size and t["images_per_s"])
            print(f"decode alone at {size} px: {rate:.0f} img/s; share of extraction time: {shares}", flush=True)
            decoding.append({"size": size, "images_per_s": rate, "sample": args.decode_sample})
    sets = [[i] for i in range(len(members))] + [[int(i) for i in c.split("+")] for c in args.combos]
    rows = []
    print("\n| members | dim | extract s | img/s (x first) | cv C | test acc | "
          + " | ".join(f"C={c}: cv / test" for c in args.grid) + " |")
    print("|---" * (6 + len(args.grid)) + "|")
    for chosen in sets:
        result = score([Path(timings[i]["cache"]) for i in chosen], args.grid)
        seconds = [timings[i]["seconds"] for i in chosen]
        total = sum(seconds) if None not in seconds else None
        rate = timings[chosen[0]]["images_per_s"] if len(chosen) == 1 else None
        row = {"members": [members[i].label for i in chosen], "extract_seconds": total, **result}
        rows.append(row)
        rate_text = f"{rate:.1f} ({rate / base_rate:.2f}x)" if rate and base_rate else "-"
        total_text = f"{total:.0f}" if total is not None else "?"
        print(f"| {' + '.join(row['members'])} | {result['dim']} | {total_text} | {rate_text} | {result['cv_c']} | "
              f"**{result['test_accuracy']:.4f}** | "
              + " | ".join(f"{result['cv_at_c'][c]:.4f} / {result['test_at_c'][c]:.4f}" for c in args.grid) + " |",
              flush=True)
    report = {"members": [m.label for m in members], "timings": timings, "decoding": decoding, "rows": rows}
    finish_report(bench_command(), report, args.json)


if __name__ == "__main__":
    main()
