"""The dataset scan at scale: seconds and peak RSS of `scan_dataset` on N empty image files in C class folders.

Usage:
    python bench/scan_scale.py [--files 1000000] [--classes 100] [--root DIR] [--keep]

Makes N empty ``.png`` files (``ROOT/cNN/NNNNNNN.png``) unless ROOT already
holds them, then measures, each in its own fresh process:

* ``floor``: what any scan must do, in Python: ``os.scandir`` of every class
  folder and one ``stat`` per file, nothing else;
* ``scan``: ``tlfeat.data.scan.scan_dataset`` (scan, split, canonical order);
  then, timed apart and after the peak RSS is taken, the extraction ledger's
  matching of a cache's rows with the scan's entries (all of them, in canonical
  order), which every incremental or up-to-date rerun does first.

Reports seconds, microseconds per file, and peak RSS (the whole process, as
the OS counts it; Python's own ~10 MB included). Files are deleted at the end
unless ``--keep`` (ROOT defaults to a temporary folder). The filesystem's cache
is warm for both: the files were just made or listed.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

from isolated import bench_command, finish_report, parse_bench_args, run_isolated

SIDES = ("floor", "scan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(side: str, root: str) -> dict:
    start = time.perf_counter()
    if side == "floor":
        n = 0
        for class_dir in sorted((e for e in os.scandir(root) if e.is_dir()), key=lambda e: e.name):
            for entry in os.scandir(class_dir.path):
                entry.stat()
                n += 1
    else:
        from tlfeat.data.scan import scan_dataset

        scan = scan_dataset(root)
        n = len(scan.entries)
        seconds, peak = time.perf_counter() - start, _peak_rss_mb()
        import numpy as np  # not at the top: the floor's RSS stays that of a bare scan

        from tlfeat.extraction.ledger import OLD_CACHE, Ledger

        paths, sizes, mtimes, inos, ctimes = zip(*((e.relpath, e.size, e.mtime_ns, e.ino, e.ctime_ns)
                                                   for e in scan.entries))
        digests = np.ones((n, 32), dtype=np.uint8)  # recorded, never read: every stat matches
        start = time.perf_counter()
        ledger = Ledger(scan.entries, scan.layout, scan.root)
        ledger.record(ledger.add_source(OLD_CACHE, n), paths, sizes, mtimes, stats=(inos, ctimes, digests))
        matched = {"match_seconds": time.perf_counter() - start, "matched": ledger.n_rows()}
        return {"files": n, "seconds": seconds, "peak_rss_mb": peak, **matched}
    return {"files": n, "seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb()}


def make_files(root: Path, files: int, classes: int) -> None:
    """Empty PNG-named files, round-robin over the class folders (skipped when already there)."""
    marker = root / f".made-{files}-{classes}"
    if marker.exists():
        return
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        os.close(os.open(root / f"c{i % classes:02d}" / f"{i:07d}.png", os.O_CREAT | os.O_WRONLY, 0o644))
    marker.touch()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--root", type=Path, help="where the files go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="leave the files for the next run")
    args = parse_bench_args(parser, _child)
    if args is None:
        return
    command = bench_command()
    root = args.root or Path(tempfile.mkdtemp(prefix="tlfeat-scan-"))
    report: dict = {"command": command, "files": args.files, "classes": args.classes}
    try:
        started = time.perf_counter()
        make_files(root, args.files, args.classes)
        report["make_seconds"] = time.perf_counter() - started
        for side in SIDES:
            report[side] = run_isolated(__file__, side, str(root))
            assert report[side]["files"] == args.files, report[side]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    floor, scan = report["floor"], report["scan"]
    per_file = {s: 1e6 * report[s]["seconds"] / args.files for s in SIDES}
    print(f"{args.files} empty files in {args.classes} folders: scan {scan['seconds']:.1f} s "
          f"({per_file['scan']:.1f} us/file), peak RSS {scan['peak_rss_mb']:.0f} MB; floor (scandir + stat) "
          f"{floor['seconds']:.1f} s ({per_file['floor']:.1f} us/file), {floor['peak_rss_mb']:.0f} MB; "
          f"scan beyond the floor {per_file['scan'] - per_file['floor']:.1f} us/file "
          f"({scan['seconds'] / floor['seconds']:.1f}x)")
    print(f"matching a cache's {scan['matched']} rows (paths and file identities, in canonical order) with the "
          f"scan, as an incremental run does: {scan['match_seconds']:.2f} s")
    finish_report(command, report, args.json)


if __name__ == "__main__":
    main()
