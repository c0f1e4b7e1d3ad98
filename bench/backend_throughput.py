"""`extract` under each Keras backend on the CPU: the same images, the same backbone, one process each.

Usage:
    python bench/backend_throughput.py [--images 200] [--backbone efficientnet_lite0] [--repeats 2]
        [--backends tensorflow jax torch] [--python-for torch=/path/to/python] [--scene15 DIR] [--json OUT]

Each run is `tlfeat.extract` of the first N Scene15 images (class-balanced, copied to a temporary
folder once) into a fresh cache, in a child process with KERAS_BACKEND set; the backends take turns,
--repeats times, so a busy machine slows each alike. Reported per backend: the median of extract's
own rate (computed images per second, model build excluded) and of the child's wall clock, and the
ratio to TensorFlow's. A backend whose Python lacks it (torch is not a tlfeat dependency) can run
under another interpreter: --python-for torch=/venv/bin/python.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from extract_throughput import SCENE15, make_subset
from isolated import bench_command, finish_report

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import json, resource, sys, time
import keras
from tlfeat.extraction.run import extract
started = time.perf_counter()
summary = extract(sys.argv[1], out=sys.argv[2], backbone=sys.argv[3], progress=False, workers=2)
print(json.dumps({"backend": keras.backend.backend(), "images_per_s": summary.images_per_s,
                  "n": summary.n_computed, "extract_s": time.perf_counter() - started,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_backend(python: str, backend: str, data: Path, out: Path, backbone: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    result = subprocess.run([python, "-c", CHILD, str(data), str(out), backbone], capture_output=True, text=True,
                            env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{backend} failed:\n{result.stderr[-3000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["backend"] == backend, record
    record["wall_s"] = time.perf_counter() - started
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax", "torch"])
    parser.add_argument("--python-for", nargs="*", default=[], metavar="BACKEND=PYTHON")
    parser.add_argument("--scene15", type=Path, default=SCENE15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pythons = dict(item.split("=", 1) for item in args.python_for)
    runs: dict[str, list[dict]] = {backend: [] for backend in args.backends}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_subset(args.scene15, args.images, Path(tmp) / "data")
        for repeat in range(args.repeats):
            for backend in args.backends:
                out = Path(tmp) / f"{backend}-{repeat}.h5"
                record = run_backend(pythons.get(backend, sys.executable), backend, data, out, args.backbone)
                runs[backend].append(record)
                print(f"{backend} run {repeat + 1}: {record['images_per_s']:.1f} img/s, {record['wall_s']:.1f} s wall, "
                      f"peak RSS {record['max_rss_mb']:.0f} MB", flush=True)
    rows = []
    for backend, records in runs.items():
        rate = median(r["images_per_s"] for r in records)
        rows.append({"backend": backend, "images": records[0]["n"], "images_per_s": rate,
                     "wall_s": median(r["wall_s"] for r in records),
                     "max_rss_mb": max(r["max_rss_mb"] for r in records), "runs": records})
    base = next((row["images_per_s"] for row in rows if row["backend"] == "tensorflow"), None)
    print(f"\n{args.backbone}, {rows[0]['images']} Scene15 images, CPU ({os.cpu_count()} cores), medians of "
          f"{args.repeats}:")
    for row in rows:
        ratio = f", {row['images_per_s'] / base:.2f}x TensorFlow" if base else ""
        print(f"  {row['backend']:<10} {row['images_per_s']:7.1f} img/s  {row['wall_s']:6.1f} s wall  "
              f"peak RSS {row['max_rss_mb']:5.0f} MB{ratio}")
    finish_report(bench_command(), {"backbone": args.backbone, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
