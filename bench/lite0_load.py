"""Offline EfficientNet-Lite0: first build (reading the .pth and converting) vs later builds (cached), one run.

Usage:
    python bench/lite0_load.py [--repeats 3] [--json OUT]

Each build runs in a fresh process with the same empty $TLFEAT_HOME: the first
reads the PyTorch pickle without torch, converts it to the Keras layout and
caches it; the next --repeats builds load the cached file. Timed: the
`tlfeat.backbones.build_model(efficientnet_lite0, "imagenet")` call alone, Keras
already imported. The target is a cached build under 2 s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from statistics import median

from isolated import bench_command, finish_report, parse_bench_args, run_isolated

TARGET_S = 2.0


def _child_build() -> dict:
    import keras  # noqa: F401  imported before the clock starts

    from tlfeat.backbones import build_model, get_backbone

    spec = get_backbone("efficientnet_lite0")
    start = time.perf_counter()
    build_model(spec, "imagenet")
    return {"seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parse_bench_args(parser, lambda kind: _child_build())
    if args is None:
        return

    with tempfile.TemporaryDirectory() as home:
        os.environ["TLFEAT_HOME"] = home  # inherited by the children: one fresh conversion cache
        first = run_isolated(__file__, "build")["seconds"]
        cached = [run_isolated(__file__, "build")["seconds"] for _ in range(args.repeats)]
    command = bench_command()
    report = {"command": command, "cpu_count": os.cpu_count(), "first_build_s": first, "cached_build_s": cached,
              "ratio_first_to_cached": first / median(cached)}
    print(f"efficientnet_lite0 imagenet: first build (convert + cache) {first:.2f} s; cached builds "
          f"{', '.join(f'{s:.2f}' for s in cached)} s (median {median(cached):.2f} s, target < {TARGET_S:.0f} s); "
          f"first / cached {report['ratio_first_to_cached']:.1f}x")
    finish_report(command, report, args.json)


if __name__ == "__main__":
    main()
