"""Streaming heads (fit-head --streaming) vs the in-memory heads on the same cache, in one run.

Usage:
    python bench/streaming_fit.py --cache CACHE.h5 [--chunk-rows 256] [--passes 10] [--json OUT]

For logreg and linear-svm: `tlfeat.heads.fit.fit_heads` (the whole cache in memory,
LogisticRegression / calibrated LinearSVC) against `tlfeat.heads.streaming.fit_streaming`
(chunks of --chunk-rows rows, SGD, --passes passes), each in its own process:
wall seconds of the call (loading, fitting, scoring, writing), test accuracy, and
the peak of Python-traced memory (tracemalloc: numpy arrays included) after a
warm-up call, so one-time import costs are left out.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from isolated import bench_command, finish_report, parse_bench_args, run_isolated

HEADS = ("logreg", "linear-svm")


def _child(kind: str, cache: str, head: str, out: str, chunk_rows: str, passes: str) -> dict:
    import tracemalloc

    from tlfeat.heads.fit import fit_heads
    from tlfeat.heads.streaming import fit_streaming

    def fit(target: str) -> object:
        if kind == "memory":
            return fit_heads([Path(cache)], head=head, out=Path(target))
        return fit_streaming(Path(cache), head=head, out=Path(target), chunk_rows=int(chunk_rows), passes=int(passes))

    fit(out + "-warm-up")
    tracemalloc.start()
    start = time.perf_counter()
    result = fit(out).results[0]
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    return {"seconds": seconds, "fit_seconds": result.fit_seconds, "test_accuracy": result.scores["test"]["accuracy"],
            "peak_traced_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="a tlfeat cache with train and test rows")
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--passes", type=int, default=10)
    args = parse_bench_args(parser, _child)
    if args is None:
        return
    if args.cache is None:
        raise SystemExit("give --cache CACHE.h5")

    command = bench_command()
    report: dict = {"command": command, "cpu_count": os.cpu_count(), "heads": {}}
    print("| head | in memory: s | test acc | peak MB | streaming: s | test acc | peak MB | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for head in HEADS:
            sides = {
                kind: run_isolated(__file__, kind, str(args.cache), head, f"{tmp}/{kind}-{head}",
                                   str(args.chunk_rows), str(args.passes))
                for kind in ("memory", "streaming")
            }
            report["heads"][head] = sides
            memory, streaming = sides["memory"], sides["streaming"]
            print(f"| {head} | {memory['seconds']:.2f} | {memory['test_accuracy']:.4f} | {memory['peak_traced_mb']:.1f} "
                  f"| {streaming['seconds']:.2f} | {streaming['test_accuracy']:.4f} | {streaming['peak_traced_mb']:.1f} "
                  f"| {streaming['seconds'] / memory['seconds']:.2f}x |", flush=True)
    print()
    finish_report(command, report, args.json)


if __name__ == "__main__":
    main()
