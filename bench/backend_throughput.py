"""`extract` under each Keras backend on the CPU: the same images, the same backbone, one process each.

Usage:
    python bench/backend_throughput.py [--images 200] [--backbone efficientnet_lite0] [--repeats 2]
        [--backends tensorflow jax torch] [--python-for torch=/path/to/python] [--scene15 DIR] [--json OUT]

Each run is `tlfeat.extract` of the first N Scene15 images (class-balanced, copied to a temporary
folder once) into a fresh cache, in a child process with KERAS_BACKEND set; the backends take turns,
--repeats times, so a busy machine slows each alike. Reported per backend:
  * the median of extract's own rate (computed images per second, model build excluded) and of the
    child's wall clock, and the ratio to TensorFlow's;
  * the model alone (tlfeat's extractor, batches of 32 random uint8 images): the first batch's seconds
    (tracing and compilation) and the rate of the 4 batches after it, to tell the backend's arithmetic
    from tlfeat's pipeline;
  * how far its cached features are from TensorFlow's: the largest absolute difference and the median
    over rows of |a - b| / |b| (L2 norms).
A backend whose Python lacks it (torch is not a tlfeat dependency) can run under another interpreter:
--python-for torch=/venv/bin/python.
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

import numpy as np

from extract_throughput import SCENE15, make_subset
from isolated import bench_command, finish_report

REPO = Path(__file__).resolve().parents[1]
EXTRACT = """
import json, resource, sys, time
import keras
from tlfeat.extraction.run import extract
started = time.perf_counter()
summary = extract(sys.argv[1], out=sys.argv[2], backbone=sys.argv[3], progress=False, workers=2)
print(json.dumps({"backend": keras.backend.backend(), "images_per_s": summary.images_per_s,
                  "n": summary.n_computed, "extract_s": time.perf_counter() - started,
                  "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
MODEL_ALONE = """
import json, sys, time
import keras, numpy as np
from tlfeat.backbones import get_backbone
from tlfeat.runtime import FeatureExtractor
spec = get_backbone(sys.argv[1])
extractor = FeatureExtractor(spec, "imagenet", spec.input_size, batch_size=32)
pixels = np.random.default_rng(0).integers(0, 256, (32, spec.input_size, spec.input_size, 3), dtype=np.uint8)
started = time.perf_counter(); extractor(pixels); first = time.perf_counter() - started
started = time.perf_counter()
for _ in range(4):
    extractor(pixels)
print(json.dumps({"backend": keras.backend.backend(), "first_batch_s": first,
                  "images_per_s": 4 * 32 / (time.perf_counter() - started)}))
"""


def run_child(python: str, backend: str, script: str, *args: str) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    started = time.perf_counter()
    result = subprocess.run([python, "-c", script, *args], capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{backend} failed:\n{result.stderr[-3000:]}")
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["backend"] == backend, record
    record["wall_s"] = time.perf_counter() - started
    return record


def agreement(cache: Path, reference: Path) -> dict:
    """How far `cache`'s features are from `reference`'s (the same images, rows in the same order)."""
    from tlfeat.cache import load

    ours, theirs = load(cache), load(reference)
    assert list(ours.paths) == list(theirs.paths)
    relative = np.linalg.norm(ours.features - theirs.features, axis=1) / np.linalg.norm(theirs.features, axis=1)
    return {"max_abs": float(np.abs(ours.features - theirs.features).max()), "median_relative": float(np.median(relative)),
            "largest_feature": float(np.abs(theirs.features).max())}


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
    alone: dict[str, dict] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_subset(args.scene15, args.images, Path(tmp) / "data")
        for repeat in range(args.repeats):
            for backend in args.backends:
                python = pythons.get(backend, sys.executable)
                record = run_child(python, backend, EXTRACT, str(data), str(Path(tmp) / f"{backend}-{repeat}.h5"),
                                   args.backbone)
                runs[backend].append(record)
                print(f"{backend} run {repeat + 1}: {record['images_per_s']:.1f} img/s, {record['wall_s']:.1f} s wall, "
                      f"peak RSS {record['max_rss_mb']:.0f} MB", flush=True)
        for backend in args.backends:
            alone[backend] = run_child(pythons.get(backend, sys.executable), backend, MODEL_ALONE, args.backbone)
        reference = Path(tmp) / f"{args.backends[0]}-0.h5"
        for backend, records in runs.items():
            rows.append({"backend": backend, "images": records[0]["n"],
                         "images_per_s": median(r["images_per_s"] for r in records),
                         "wall_s": median(r["wall_s"] for r in records),
                         "max_rss_mb": max(r["max_rss_mb"] for r in records), "runs": records,
                         "model_alone": alone[backend],
                         "versus_first": agreement(Path(tmp) / f"{backend}-0.h5", reference)})
    base = rows[0]["images_per_s"]
    print(f"\n{args.backbone}, {rows[0]['images']} Scene15 images, CPU ({os.cpu_count()} cores), medians of "
          f"{args.repeats}; ratios and feature differences against {rows[0]['backend']}:")
    for row in rows:
        model, versus = row["model_alone"], row["versus_first"]
        print(f"  {row['backend']:<10} extract {row['images_per_s']:6.1f} img/s ({row['images_per_s'] / base:.2f}x), "
              f"{row['wall_s']:5.1f} s wall, peak RSS {row['max_rss_mb']:5.0f} MB; model alone "
              f"{model['images_per_s']:5.1f} img/s, first batch {model['first_batch_s']:.1f} s; features: max abs "
              f"difference {versus['max_abs']:.2g} (largest feature {versus['largest_feature']:.2f}), median relative "
              f"{versus['median_relative']:.2g}")
    finish_report(bench_command(), {"backbone": args.backbone, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
