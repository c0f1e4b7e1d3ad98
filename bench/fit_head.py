"""Heads on the cache vs the study's way of training its head, in one run.

Usage:
    python bench/fit_head.py [--cache CACHE.h5] [--data DATA] [--backbone efficientnet_lite0]
        [--weights imagenet] [--images-limit N] [--seed 0] [--json OUT]

Without --cache, DATA (default: Scene15) is extracted first with `tlfeat.extraction.run.extract`
into cache/<dataset>-<backbone>.h5 (incremental: a cache already there and up to date
is reused, nothing recomputed).

(a) Every scikit-learn head (logreg, linear-svm, knn, mlp) is fitted with
    `tlfeat.heads.fit.fit_heads`, as `cli.py fit-head --head NAME` does: train split,
    scored on every split, model and reports saved. Reported per head: the fit
    alone, the whole fit_heads call (loading, scoring, writing included), test
    accuracy; and the wall time of all four together.
(b) The study's Keras head (Dense 128 -> Dropout 0.3 -> softmax, RMSprop 1e-3,
    batch 32, 20 epochs, tlfeat.heads.KerasReportHead's settings), two ways:
  * cached: KerasReportHead fitted on the cached train features, validated on
    the val rows every epoch; early stopping is switched off so all 20 epochs run.
  * study way: the backbone, frozen, in the graph with the same head; the same
    train and val images decoded, preprocessed and run through the backbone
    every epoch (a threaded keras.utils.PyDataset). ONE epoch is timed, train
    pass plus validation pass, and multiplied by 20. Tracing is timed
    separately (a warm-up fit on one or two batches) and left out of the
    estimate, which makes the study way look faster than it is: the ratio is a
    lower bound. With --images-limit N only N train images (and val images in
    the same proportion), spread evenly over the split, are timed, and the
    epoch time is scaled up by the image count; the output says so. The
    epoch's fixed costs (starting the decoding workers, the validation pass's
    setup) are scaled up too, so a small N overstates the study way: keep N in
    the hundreds, or leave it off for the real figure.
Every figure of (a) and (b) is given as a ratio against the study way's 20
epochs, measured in the same run. Extraction and each measurement run in their
own subprocess, so no measurement pays for another's imports or memory.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from isolated import bench_command, finish_report, parse_bench_args, run_isolated

REPO = Path(__file__).resolve().parents[1]
SCENE15 = (REPO / ".." / "shared" / "data" / "scene15").resolve()
STUDY_HEAD = "report"


def study_model(base: Any, n_classes: int, image_size: int) -> Any:
    """The study's model written in plain Keras: `base` in the graph, then the study's head.

    The head is tlfeat's (HIDDEN_UNITS, DROPOUT, no activation on the hidden
    layer). `training=False` is what the study and Keras' transfer-learning
    guide write; fit overrides it (keras-team/keras#20285), so only base layers
    with trainable=False actually stay in inference mode.
    """
    import keras

    from tlfeat.heads.study import DROPOUT, HIDDEN_UNITS

    inputs = keras.Input((image_size, image_size, 3))
    hidden = keras.layers.Dense(HIDDEN_UNITS)(base(inputs, training=False))
    hidden = keras.layers.Dropout(DROPOUT)(hidden)
    # float32 softmax under mixed precision too, as Keras' mixed-precision guide (and tlfeat) do.
    outputs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32")(hidden)
    return keras.Model(inputs, outputs)


def image_batches(
    files: Sequence[Path], labels: np.ndarray, size: int, preprocess: Callable[[np.ndarray], np.ndarray],
    batch_size: int,
) -> Any:
    """A keras.utils.PyDataset that decodes and preprocesses its batch of files each time it is asked.

    Decoded with tlfeat's own decoder (same pixels as the cache) by worker
    threads, so decoding overlaps the model: if anything faster than a
    single-threaded loader, which errs in the study way's favour.
    """
    import keras

    from tlfeat.data.cores import default_workers
    from tlfeat.data.decode import decode_image

    class ImageBatches(keras.utils.PyDataset):
        def __len__(self) -> int:
            return -(-len(files) // batch_size)

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
            chunk = slice(index * batch_size, (index + 1) * batch_size)
            pixels = np.stack([decode_image(path, size) for path in files[chunk]]).astype(np.float32)
            return preprocess(pixels), labels[chunk]

    return ImageBatches(workers=default_workers(), use_multiprocessing=False)


def evenly_spaced(n: int, m: int) -> np.ndarray:
    """m indices spread evenly over range(n) (all of them when m >= n)."""
    return np.arange(n) if m >= n else np.unique(np.linspace(0, n - 1, m).round().astype(int))


def _child_extract(data: str, out: str, backbone: str, weights: str) -> dict:
    from tlfeat.extraction.run import extract

    summary = extract(Path(data), Path(out), backbone=backbone, weights=weights, progress=False)
    return {"cache": str(summary.out), "computed": summary.n_computed, "seconds": summary.seconds}


def _child_heads(cache: str, out: str, seed: str) -> dict:
    from tlfeat.heads.fit import fit_heads
    from tlfeat.heads import HEAD_NAMES

    rows = []
    started = time.perf_counter()
    for name in HEAD_NAMES:
        if name == STUDY_HEAD:
            continue
        call_started = time.perf_counter()
        result = fit_heads([Path(cache)], head=name, out=Path(out), seed=int(seed)).results[0]
        split = "test" if "test" in result.scores else list(result.scores)[-1]
        rows.append({
            "head": name,
            "params": result.params,
            "fit_seconds": result.fit_seconds,
            "call_seconds": time.perf_counter() - call_started,
            "split": split,
            "accuracy": result.scores[split]["accuracy"],
        })
    return {"heads": rows, "total_seconds": time.perf_counter() - started}


def _child_report_cached(cache: str, seed: str) -> dict:
    import keras  # noqa: F401  imported before the clock starts, as on the study-way side

    from tlfeat.cache import load
    from tlfeat.heads.registry import fit_estimator, get_head

    data = load(cache)
    train, val = data.select("train"), data.select("val")
    estimator = get_head(STUDY_HEAD).build(int(seed))
    # The study trained a fixed number of epochs; patience = epochs keeps early stopping from cutting it short.
    estimator.set_params(patience=estimator.epochs)
    validation = (val.features, val.labels) if len(val) else None
    started = time.perf_counter()
    fit_estimator(estimator, train.features, train.labels, validation)
    seconds = time.perf_counter() - started
    split = "test" if np.any(data.split == "test") else "val"
    scored = data.select(split)
    return {
        "seconds": seconds, "epochs": estimator.epochs_run_, "n_train": len(train), "n_val": len(val),
        "split": split, "accuracy": float(estimator.score(scored.features, scored.labels)),
    }


def _child_report_images(cache: str, images_limit: str, seed: str) -> dict:
    import keras

    from tlfeat.backbones import build_model, get_backbone
    from tlfeat.cache import load
    from tlfeat.heads import get_head

    data = load(cache)
    spec = get_backbone(data.attrs["backbone"])
    size = int(data.attrs["input_size"])
    root = Path(data.attrs["dataset_root"])
    head = get_head(STUDY_HEAD).build(int(seed))  # the hyperparameters the cached side uses
    limit = int(images_limit)

    def split_files(split: str, keep: int) -> tuple[list[Path], np.ndarray]:
        rows = data.select(split)
        chosen = evenly_spaced(len(rows), keep) if limit else np.arange(len(rows))
        return [root / rows.paths[i] for i in chosen], rows.labels[chosen]

    n_train, n_val = (int(np.sum(data.split == split)) for split in ("train", "val"))
    train_files, train_labels = split_files("train", limit)
    val_files, val_labels = split_files("val", max(1, round(limit * n_val / n_train)) if n_val else 0)
    missing = [p for p in train_files + val_files if not p.is_file()]
    if missing:
        raise SystemExit(f"{missing[0]}: image of the cache not found (dataset_root {root} moved?)")

    base = build_model(spec, data.attrs["weights_source"], size)
    base.trainable = False
    keras.utils.set_random_seed(int(seed))
    model = study_model(base, len(data.class_names), size)
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=head.learning_rate),
        loss="sparse_categorical_crossentropy", metrics=["accuracy"],
    )

    def batches(files: list[Path], labels: np.ndarray) -> Any:
        return image_batches(files, labels, size, spec.preprocess, head.batch_size)

    def fit(files: list[Path], labels: np.ndarray, v_files: list[Path], v_labels: np.ndarray) -> float:
        validation = batches(v_files, v_labels) if v_files else None
        started = time.perf_counter()
        model.fit(batches(files, labels), validation_data=validation, epochs=1, shuffle=False, verbose=0)
        return time.perf_counter() - started

    def warm(files: list[Path]) -> slice:
        # One full batch plus the epoch's last, partial one: every batch shape the timed epoch will see.
        return slice(0, head.batch_size + len(files) % head.batch_size)

    warmup = fit(train_files[warm(train_files)], train_labels[warm(train_files)],
                 val_files[warm(val_files)], val_labels[warm(val_files)])
    epoch = fit(train_files, train_labels, val_files, val_labels)
    used, total = len(train_files) + len(val_files), n_train + n_val
    return {
        "backbone": spec.name, "weights": data.attrs["weights_source"], "image_size": size,
        "epochs": head.epochs, "warmup_seconds": warmup, "epoch_seconds": epoch,
        "train_images": len(train_files), "val_images": len(val_files), "n_train": n_train, "n_val": n_val,
        "scale": total / used, "seconds": head.epochs * epoch * total / used,
    }


CHILDREN = {
    "extract": _child_extract,
    "heads": _child_heads,
    "report-cached": _child_report_cached,
    "report-images": _child_report_images,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="a tlfeat cache; default: extract --data into cache/")
    parser.add_argument("--data", type=Path, default=SCENE15, help="dataset to extract when no --cache")
    parser.add_argument("--backbone", default="efficientnet_lite0", help="for extraction when no --cache")
    parser.add_argument("--weights", default="imagenet", help="for extraction when no --cache")
    parser.add_argument("--images-limit", type=int, default=0,
                        help="time the study-way epoch on N train images (val in proportion), scaled up; 0: all")
    parser.add_argument("--seed", type=int, default=0)
    args = parse_bench_args(parser, lambda kind, *rest: CHILDREN[kind](*rest))
    if args is None:
        return

    from tlfeat.reports import markdown_table

    command = bench_command()
    report: dict = {"command": command, "cpu_count": os.cpu_count()}
    if args.cache is None:
        from tlfeat.extraction.run import default_output

        out = REPO / default_output(args.data, args.backbone)
        print(f"extracting {args.data} with {args.backbone} into {out} (reused if up to date) ...", flush=True)
        report["extract"] = run_isolated(__file__, "extract", str(args.data), str(out), args.backbone, args.weights)
        cache = Path(report["extract"]["cache"])
    elif not args.cache.is_file():
        raise SystemExit(f"{args.cache}: cache not found")
    else:
        cache = args.cache
    report["cache"] = str(cache.resolve())

    with tempfile.TemporaryDirectory() as tmp:
        heads = report["heads"] = run_isolated(__file__, "heads", str(cache), tmp, str(args.seed))
    cached = report["report_cached"] = run_isolated(__file__, "report-cached", str(cache), str(args.seed))
    study = report["report_study_way"] = run_isolated(
        __file__, "report-images", str(cache), str(args.images_limit), str(args.seed)
    )
    baseline = study["seconds"]
    report["ratios_vs_study_way"] = {
        **{h["head"]: baseline / h["call_seconds"] for h in heads["heads"]},
        "sklearn_heads_total": baseline / heads["total_seconds"],
        "report_cached": baseline / cached["seconds"],
    }

    split = heads["heads"][0]["split"]
    print(f"\n(a) scikit-learn heads on {cache.name} (fit_heads, one call per head)\n")
    rows = [[h["head"], ", ".join(f"{k}={v}" for k, v in h["params"].items()), f"{h['accuracy']:.4f}",
             f"{h['fit_seconds']:.2f}", f"{h['call_seconds']:.2f}", f"{baseline / h['call_seconds']:.0f}x"]
            for h in heads["heads"]]
    rows.append(["all four", "", "", f"{sum(h['fit_seconds'] for h in heads['heads']):.2f}",
                 f"{heads['total_seconds']:.2f}", f"{baseline / heads['total_seconds']:.0f}x"])
    headers = ["head", "params", f"{split} acc", "fit s", "fit_heads wall s", "study-way report head / this"]
    print(markdown_table(headers, rows), end="")

    timed = f"{study['train_images']} train + {study['val_images']} val images"
    how = f"1 epoch ({timed}) x {study['epochs']}"
    if study["scale"] != 1:
        how += (f" x {study['scale']:.2f} (--images-limit: scaled to all "
                f"{study['n_train']} + {study['n_val']} images)")
    print(f"\n(b) the study's Keras head, {study['epochs']} epochs, {cached['n_train']} train / "
          f"{cached['n_val']} val images ({study['backbone']}, weights {study['weights']}, {study['image_size']} px)\n")
    print(markdown_table(["report head", "how", "seconds", f"{cached['split']} acc", "ratio"], [
        ["on cached features (KerasReportHead)", f"{cached['epochs']} epochs timed", f"{cached['seconds']:.1f}",
         f"{cached['accuracy']:.4f}", "1x"],
        ["study way: frozen base in the graph, images decoded every epoch", how, f"{baseline:.1f}", "-",
         f"{baseline / cached['seconds']:.0f}x"],
    ]), end="")
    print(f"\nstudy way: warm-up (tracing) {study['warmup_seconds']:.1f} s, left out of its estimate "
          f"(so the ratios are lower bounds); one epoch {study['epoch_seconds']:.1f} s")
    finish_report(command, report, args.json)


if __name__ == "__main__":
    main()
