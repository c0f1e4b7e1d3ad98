"""The Ray engine vs the local engine of `extract`, on the same images, in one run.

Usage:
    python bench/ray_extract.py [--images 500] [--backbones efficientnet_lite0 resnet101]
        [--repeats 3] [--scene15 DIR] [--json OUT]

The same N Scene15 images (a class-balanced temp copy) are extracted into a
fresh cache, each run in its own process, the sides taking turns --repeats times:
  * local: `extract(engine="local")`;
  * ray: `extract(engine="ray")` with no address, so it starts a private local
    Ray instance (2 CPUs here) and stops it at the end, as `cli.py extract
    --engine ray` does on a laptop;
  * ray, running cluster: the same against a Ray instance started beforehand
    with `ray start --head` (`--address auto`), as on a cluster: no Ray start or
    stop inside the run.
Each run is timed from the call of `extract` to its return (Keras import,
model build, Ray start and stop, decoding, embedding and the final write
included), and by its progress bar: seconds to the first finished batch and the
steady rate after it. Efficientnet_lite0 uses its ImageNet weights, resnet101
random weights (no download here). Medians over the repeats, with ranges. The
caches of the two engines are compared row by row.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path
from statistics import median

from extract_throughput import SCENE15, make_subset
from isolated import bench_command, finish_report, parse_bench_args, run_isolated

SIDES = ("local", "ray", "ray-cluster")


def _child(side: str, data: str, backbone: str, out: str) -> dict:
    import tlfeat.extraction.run as extract_module

    stamps: list[tuple[float, int]] = []

    class RecordingBar:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> "RecordingBar":
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: int) -> None:
            stamps.append((time.perf_counter(), n))

    extract_module.progress_bar = RecordingBar  # the bench reads the batches' finishing times off the bar
    ray_options = None
    if side == "ray-cluster":
        from tlfeat.extraction.ray_engine import RayOptions

        ray_options = RayOptions(address="auto")
    weights = "imagenet" if backbone == "efficientnet_lite0" else "none"
    start = time.perf_counter()
    summary = extract_module.extract(
        Path(data), Path(out), backbone=backbone, weights=weights, progress=False,
        engine="local" if side == "local" else "ray", ray_options=ray_options,
    )
    seconds = time.perf_counter() - start
    after_first = sum(n for _, n in stamps[1:])
    steady_seconds = stamps[-1][0] - stamps[0][0]
    return {
        "seconds": seconds,
        "first_batch_s": stamps[0][0] - start,
        "steady_images_per_s": after_first / steady_seconds if steady_seconds > 0 else float("nan"),
        "images": summary.n_computed,
    }


def _compare(a: Path, b: Path) -> dict:
    import numpy as np

    from tlfeat import cache

    x, y = cache.load(a), cache.load(b)
    return {"same_rows": list(x.paths) == list(y.paths),
            "max_abs_difference": float(np.abs(x.features - y.features).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--backbones", nargs="*", default=["efficientnet_lite0", "resnet101"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scene15", type=Path, default=SCENE15)
    args = parse_bench_args(parser, _child)
    if args is None:
        return

    command = bench_command()
    report: dict = {"command": command, "images": args.images, "backbones": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_subset(args.scene15, args.images, Path(tmp) / "data")
        for backbone in args.backbones:
            runs: dict[str, list[dict]] = {side: [] for side in SIDES}
            for repeat in range(args.repeats):
                for side in SIDES:
                    out = Path(tmp) / f"{backbone}-{side}-{repeat}.h5"
                    if side == "ray-cluster":
                        subprocess.run(["ray", "start", "--head", "--include-dashboard=false", "--disable-usage-stats"],
                                       check=True, capture_output=True)
                    try:
                        runs[side].append(run_isolated(__file__, side, str(data), backbone, str(out)))
                    finally:
                        if side == "ray-cluster":
                            subprocess.run(["ray", "stop", "--force"], check=False, capture_output=True)
            local = median(r["seconds"] for r in runs["local"])
            summary = {}
            for side in SIDES:
                seconds = [r["seconds"] for r in runs[side]]
                summary[side] = {
                    "seconds": median(seconds), "range": [min(seconds), max(seconds)],
                    "ratio_to_local": median(seconds) / local,
                    "first_batch_s": median(r["first_batch_s"] for r in runs[side]),
                    "steady_images_per_s": median(r["steady_images_per_s"] for r in runs[side]),
                }
            summary["ray_vs_local_cache"] = _compare(Path(tmp) / f"{backbone}-local-0.h5", Path(tmp) / f"{backbone}-ray-0.h5")
            report["backbones"][backbone] = {"summary": summary, "runs": runs}
            print(f"{backbone}, {args.images} images, medians of {args.repeats}:")
            for side in SIDES:
                s = summary[side]
                print(f"  {side:12s} {s['seconds']:6.1f} s ({s['range'][0]:.1f}-{s['range'][1]:.1f}) "
                      f"= {s['ratio_to_local']:.2f}x local; first batch after {s['first_batch_s']:.1f} s, "
                      f"then {s['steady_images_per_s']:.1f} img/s")
            print(f"  ray vs local cache: {summary['ray_vs_local_cache']}")
    finish_report(command, report, args.json)


if __name__ == "__main__":
    main()
