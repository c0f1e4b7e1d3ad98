"""Does fitting the study's Keras head (or fine-tuning) again and again in one process grow its memory?

Usage:
    python bench/keras_head_memory.py [--fits 10 30 60 100] [--backends tensorflow jax] [--repo DIR]
        [--seed 0] [--json OUT]
    python bench/keras_head_memory.py --finetune --fits 1 2 3 4 [--backends tensorflow]

`--finetune`: each "fit" is a whole `tlfeat.finetune` run, as a notebook runs
several: EfficientNet-Lite0 at 64 px, one epoch of each stage, on 3 classes x
16 generated 64 px PNGs.

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
import tempfile
import time
from pathlib import Path
from typing import Callable

from isolated import bench_command, finish_report, parse_bench_args, run_isolated

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL, N_FEATURES, N_CLASSES = 1089, 411, 1280, 15


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (not Linux?)")


def _head_fits(seed: int) -> Callable[[int], int]:
    """Fit i of a fresh report head on Scene15-shaped features; returns the epochs it ran."""
    import numpy as np

    from tlfeat.heads.keras_head import KerasReportHead

    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1, size=(N_CLASSES, N_FEATURES))
    y = rng.integers(0, N_CLASSES, N_TRAIN + N_VAL)
    # Overlapping classes, so early stopping ends each fit after some epochs, as on real features.
    X = np.abs(centres[y] + rng.normal(0, 2.0, size=(len(y), N_FEATURES))).astype(np.float32)
    train, val = slice(0, N_TRAIN), slice(N_TRAIN, None)

    def fit(i: int) -> int:
        head = KerasReportHead(seed=seed + i).fit(X[train], y[train], validation_data=(X[val], y[val]))
        head.predict(X[val])
        return head.epochs_run_

    return fit


def _finetune_runs(seed: int) -> Callable[[int], int]:
    """Fine-tune run i, to the end (its model saved, its test split scored); returns the epochs it ran."""
    import numpy as np
    from PIL import Image

    import tlfeat

    root = Path(tempfile.mkdtemp(prefix="finetune-memory-"))
    rng = np.random.default_rng(seed)
    for c in range(3):  # a colour and a stripe direction per class, so the runs learn something
        (root / "images" / f"class_{c}").mkdir(parents=True)
        for i in range(16):
            pixels = rng.integers(0, 60, size=(64, 64, 3)) + np.eye(3, dtype=np.int64)[c] * 150
            pixels[:: 4 + c] += 40
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / "images" / f"class_{c}" / f"{i}.png")

    def fit(i: int) -> int:
        summary = tlfeat.finetune(root / "images", epochs1=1, epochs2=1, image_size=64, batch_size=8, seed=seed,
                                  out=root / f"run{i}", progress=False, log=lambda line: None).summary
        return sum(stage["epochs_run"] for stage in summary["stages"].values())

    return fit


def _child_fits(repo: str, what: str, fits: str, seed: str) -> dict:
    sys.path.insert(0, repo)  # the measured checkout's tlfeat, not whichever one is installed
    import keras

    import tlfeat

    fit = (_finetune_runs if what == "finetune" else _head_fits)(int(seed))

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
    parser.add_argument("--finetune", action="store_true", help="each fit a whole tlfeat.finetune run")
    args = parse_bench_args(parser, lambda kind, *rest: CHILDREN[kind](*rest))
    if args is None:
        return

    from tlfeat.reports import markdown_table

    command = bench_command()
    report: dict = {"command": command, "repo": str(args.repo.resolve()), "results": []}
    for backend in args.backends:
        os.environ["KERAS_BACKEND"] = backend  # run_isolated's child inherits it
        result = run_isolated(__file__, "fits", str(args.repo.resolve()), "finetune" if args.finetune else "head",
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
