"""Does fitting the study's Keras head again and again in one process grow its memory?

Usage:
    python bench/keras_head_memory.py [--fits 10 30 60 100] [--backends tensorflow jax] [--repo DIR]
        [--seed 0] [--json OUT]

GridSearchCV, cross_val_score and `fit_heads(..., search=True)` fit a fresh
`KerasReportHead` per fold and candidate, all in one process. This fits one
after another, each dropped once fitted and used (fit with validation rows,
predict), on synthetic features of Scene15's shape: 1089 train rows and 411
validation rows of 1280 non-negative dims (EfficientNet-Lite0's pooled
features), 15 classes, the head's default settings (20 epochs, early stopping).
After each block of fits, and once `gc.collect()` has run, it reports:
  * RSS: VmRSS of /proc/self/status, in MB;
  * Python objects the garbage collector tracks, and live Keras models (none
    should outlive its head);
  * under TensorFlow, the FuncGraphs alive (traced functions' graphs) and the
    entries of TensorFlow's process-wide gradient registry.
Each backend runs in its own process, which starts with its imports done and
one warm-up fit: its RSS is the baseline. `--repo` measures another
checkout's tlfeat (e.g. a `git worktree` of an older commit), so before and
after a change come from the same script.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

from isolated import bench_command, finish_report, parse_bench_args, run_isolated

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL, N_FEATURES, N_CLASSES = 1089, 411, 1280, 15


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (not Linux?)")


def _child_fits(repo: str, fits: str, seed: str) -> dict:
    sys.path.insert(0, repo)  # the measured checkout's tlfeat, not whichever one is installed
    import keras
    import numpy as np

    import tlfeat
    from tlfeat.heads.keras_head import KerasReportHead

    rng = np.random.default_rng(int(seed))
    centres = rng.uniform(0, 1, size=(N_CLASSES, N_FEATURES))
    y = rng.integers(0, N_CLASSES, N_TRAIN + N_VAL)
    # Overlapping classes, so early stopping ends each fit after some epochs, as on real features.
    X = np.abs(centres[y] + rng.normal(0, 2.0, size=(len(y), N_FEATURES))).astype(np.float32)
    train, val = slice(0, N_TRAIN), slice(N_TRAIN, None)

    def fit(i: int) -> int:
        head = KerasReportHead(seed=int(seed) + i).fit(X[train], y[train], validation_data=(X[val], y[val]))
        head.predict(X[val])
        return head.epochs_run_

    def reading(done: int, epochs: int, started: float) -> dict:
        gc.collect()
        objects = gc.get_objects()
        row = {"fits": done, "rss_mb": rss_mb(), "epochs": epochs, "seconds": time.perf_counter() - started,
               "objects": len(objects), "models": sum(isinstance(o, keras.Model) for o in objects)}
        if keras.backend.backend() == "tensorflow":
            from tensorflow.python.framework import ops
            from tensorflow.python.framework.func_graph import FuncGraph

            row["func_graphs"] = sum(isinstance(o, FuncGraph) for o in objects)
            row["gradient_registry"] = len(ops._gradient_registry.list())
        return row

    fit(0)  # warm-up: first-call costs (kernels, allocator pools) are not growth
    started = time.perf_counter()
    rows, done, epochs = [reading(0, 0, started)], 0, 0
    for target in sorted({int(n) for n in fits.split(",")}):
        while done < target:
            done += 1
            epochs += fit(done)
        rows.append(reading(done, epochs, started))
    return {"backend": keras.backend.backend(), "keras": keras.__version__, "tlfeat": tlfeat.__file__,
            "rows": rows}


CHILDREN = {"fits": _child_fits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fits", type=int, nargs="+", default=[10, 30, 60, 100],
                        help="report after this many fits (cumulative)")
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax"])
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose tlfeat is measured")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_bench_args(parser, lambda kind, *rest: CHILDREN[kind](*rest))
    if args is None:
        return

    from tlfeat.reports import markdown_table

    command = bench_command()
    report: dict = {"command": command, "repo": str(args.repo.resolve()), "results": []}
    for backend in args.backends:
        os.environ["KERAS_BACKEND"] = backend  # run_isolated's child inherits it
        result = run_isolated(__file__, "fits", str(args.repo.resolve()),
                              ",".join(map(str, args.fits)), str(args.seed))
        report["results"].append(result)
        rows = result["rows"]
        base = rows[0]["rss_mb"]
        tf_counts = "func_graphs" in rows[0]
        headers = ["fits", "RSS MB", "growth MB", "MB / fit", "Python objects", "live models"]
        headers += ["FuncGraphs", "gradient registry"] if tf_counts else []
        headers += ["epochs run", "seconds"]
        table = []
        for row in rows:
            per_fit = f"{(row['rss_mb'] - base) / row['fits']:.2f}" if row["fits"] else "-"
            line = [row["fits"], f"{row['rss_mb']:.0f}", f"{row['rss_mb'] - base:+.0f}", per_fit, row["objects"],
                    row["models"]]
            line += [row["func_graphs"], row["gradient_registry"]] if tf_counts else []
            table.append(line + [row["epochs"], f"{row['seconds']:.0f}"])
        print(f"\n{result['backend']} (Keras {result['keras']}), tlfeat from {result['tlfeat']}\n")
        print(markdown_table(headers, table), end="")
    finish_report(command, report, args.json)


if __name__ == "__main__":
    main()
