"""Seconds per fine-tuning epoch: tlfeat.finetuning vs a plain Keras model.fit of the same model, in one run.

Usage:
    python bench/finetune_epoch.py [--backbone efficientnet_lite0] [--weights imagenet]
        [--image-size 224] [--classes 4] [--images 240] [--epochs 5] [--stages 1 2]
        [--unfreeze-top K] [--batch-size 32] [--seed 0] [--plain-inputs arrays pydataset] [--scene15 DIR]
        [--json OUT]

Data: the first --classes Scene15 class folders, --images training images in
all (an equal share per class), copied into a flat temp dataset and split
75/25 train/val by tlfeat's own scan (no test split, so nothing else is scored).
Both sides train on those same train images and validate on the same val
images every epoch, --epochs epochs per stage:
  * stage 1: base frozen, head trains (RMSprop 1e-3);
  * stage 2: the top k base layers unfrozen too (RMSprop 1e-5; k = tlfeat's
    default for the backbone, 47 for efficientnet_lite0).
Sides, each in its own subprocess:
  * tlfeat: tlfeat.finetuning.finetune as `cli.py finetune` calls it, early
    stopping off. Its images are decoded every epoch by its PyDataset, and every
    epoch saves checkpoints, history and state: all of that is in its epoch time.
  * plain: the same base (tlfeat.backbones.build_model) and head written in plain
    Keras (bench/fit_head.py's study_model), model.fit(epochs=N) per stage, same
    batch size, optimizer and dtype policy, fed the same images, decoded and
    preprocessed by tlfeat's decoder, two ways (--plain-inputs, each run apart):
    "arrays", numpy arrays decoded once before training (the strict baseline:
    no decoding in the epoch at all), and "pydataset", a threaded
    keras.utils.PyDataset decoding every epoch as tlfeat does (bench/fit_head.py's
    image_batches; it does not shuffle, which costs nothing either way).
    tlfeat runs BatchNorm in inference mode; in plain Keras only a BatchNorm
    layer with trainable=False does, so the plain side keeps the BatchNorm
    layers of the top k frozen (Keras' own fine-tuning advice). The one
    difference left: tlfeat also trains those layers' gamma/beta (trainable
    parameter counts are printed for both).
Timing, the same on both sides: wall time between consecutive epoch ends. tlfeat
does not take callbacks, so its epoch ends are the moments it logs
"stage S epoch E/N" (through finetune's `log` argument), which it does after
writing that epoch's checkpoint and state; the plain side's are
on_epoch_end of a keras.callbacks.LambdaCallback. The first epoch of each stage
(tracing) is reported apart and left out of the ratio, so --epochs must be 2 or
more. tlfeat's own per-epoch figure (history.json, which stops the clock before
the checkpoint is written) is shown too. The ratio is tlfeat / plain seconds
per epoch; the target is at most 1.10x.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from statistics import mean

import numpy as np

from isolated import bench_command, finish_report, parse_bench_args, run_isolated

REPO = Path(__file__).resolve().parents[1]
SCENE15 = (REPO / ".." / "shared" / "data" / "scene15").resolve()
RATIOS = (0.75, 0.25, 0.0)  # train/val only: finetune needs val, and a test split would only add scoring
LEARNING_RATES = {1: 1e-3, 2: 1e-5}  # tlfeat's defaults (the study's); passed to both sides
TARGET = 1.10
PLAIN_INPUTS = {
    "arrays": "numpy arrays, decoded once",
    "pydataset": "PyDataset, decoded every epoch",
}
STAGE_START = re.compile(r"stage (\d): ")  # logged just before a stage's model.fit
EPOCH_END = re.compile(r"stage (\d) epoch (\d+)/")  # logged after an epoch's checkpoint and state are written


def make_subset(scene15: Path, classes: int, images: int, dest: Path) -> Path:
    """`images` Scene15 training images, equally from the first `classes` classes, copied into a flat tree."""
    class_dirs = sorted(p for p in (scene15 / "train").iterdir() if p.is_dir())[:classes]
    for class_dir in class_dirs:
        for path in sorted(class_dir.iterdir())[: images // len(class_dirs)]:
            target = dest / class_dir.name / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)  # a copy: tlfeat's scan ignores symlinks leaving the dataset
    return dest


def stage_times(starts: dict[int, float], ends: list[tuple[int, float]]) -> dict[str, dict]:
    """Per stage: the first epoch's seconds (tracing included) and the later epochs', from epoch-end times."""
    result = {}
    for stage, started in starts.items():
        times = [started] + [t for s, t in ends if s == stage]
        result[str(stage)] = {"first_epoch_s": times[1] - times[0], "epoch_s": np.diff(times[1:]).tolist()}
    return result


def _child_plain(config: dict) -> dict:
    import keras

    from fit_head import image_batches, study_model
    from tlfeat.backbones import build_model, get_backbone
    from tlfeat.data.batches import iter_batches
    from tlfeat.data.scan import scan_dataset
    from tlfeat.runtime import accelerator_present, compute_policy

    spec = get_backbone(config["backbone"])
    size, batch_size = config["image_size"], config["batch_size"]
    scan = scan_dataset(Path(config["data"]), seed=config["seed"], ratios=RATIOS)

    def split_files(split: str) -> tuple[list[Path], np.ndarray]:
        entries = [e for e in scan.entries if e.split == split]
        return [scan.root / e.relpath for e in entries], np.array([scan.label_of(e) for e in entries])

    def decoded(files: list[Path], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images, rows = [], []
        for b in iter_batches(files, size, batch_size):  # each batch's pixels are reused: converted as they come
            images.append(spec.preprocess(b.pixels[b.ok].astype(np.float32)))
            rows += [b.start + i for i in b.ok]
        return np.concatenate(images), labels[rows]

    train, val = split_files("train"), split_files("val")
    if config["input"] == "pydataset":
        data = {"x": image_batches(*train, size, spec.preprocess, batch_size),
                "validation_data": image_batches(*val, size, spec.preprocess, batch_size)}
    else:
        x, y = decoded(*train)
        data = {"x": x, "y": y, "batch_size": batch_size, "validation_data": decoded(*val)}
    keras.config.set_dtype_policy(compute_policy(accelerator_present()))  # the policy tlfeat.finetuning picks
    base = build_model(spec, config["weights"], size)
    keras.utils.set_random_seed(config["seed"])  # as tlfeat seeds its head
    model = study_model(base, len(scan.class_names), size)

    starts, ends, trainable = {}, [], {}
    for stage in config["stages"]:
        base.trainable = stage == 2  # as tlfeat's set_unfrozen_top: a frozen model hides all its weights
        first = len(base.layers) - (config["unfreeze_top"] if stage == 2 else 0)
        for i, layer in enumerate(base.layers):
            layer.trainable = i >= first and not isinstance(layer, keras.layers.BatchNormalization)
        model.compile(
            optimizer=keras.optimizers.RMSprop(learning_rate=LEARNING_RATES[stage]),
            loss="sparse_categorical_crossentropy", metrics=["accuracy"],
        )
        trainable[str(stage)] = int(sum(np.prod(w.shape) for w in model.trainable_weights))
        timer = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs, stage=stage: ends.append((stage, time.perf_counter()))
        )
        starts[stage] = time.perf_counter()
        model.fit(**data, epochs=config["epochs"], callbacks=[timer], verbose=0)
    return {"stages": stage_times(starts, ends), "trainable_params": trainable}


def _child_tlfeat(config: dict) -> dict:
    from tlfeat.finetuning import finetune

    starts, ends = {}, []

    def log(line: str) -> None:
        now = time.perf_counter()
        if match := STAGE_START.match(line):
            starts[int(match[1])] = now
        elif match := EPOCH_END.match(line):
            ends.append((int(match[1]), now))

    epochs = {stage: config["epochs"] if stage in config["stages"] else 0 for stage in (1, 2)}
    result = finetune(
        Path(config["data"]), backbone=config["backbone"], weights=config["weights"], epochs1=epochs[1],
        epochs2=epochs[2], unfreeze_top=config["unfreeze_top"], lr1=LEARNING_RATES[1], lr2=LEARNING_RATES[2],
        batch_size=config["batch_size"], image_size=config["image_size"], seed=config["seed"], ratios=RATIOS,
        patience=0, out=Path(config["out"]), progress=False, log=log,
    )
    history = json.loads((result.out / "history.json").read_text())["epochs"]
    stages = stage_times(starts, ends)
    for stage, times in stages.items():
        times["recorded_s"] = [e["seconds"] for e in history if str(e["stage"]) == stage]
    counts = result.summary["split_counts"]
    return {"n_train": counts["train"], "n_val": counts["val"], "stages": stages,
            "trainable_params": {k: v["trainable_params"] for k, v in result.summary["stages"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--image-size", type=int, help="default: the backbone's (224)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--images", type=int, default=240, help="in all, split 75/25 into train/val")
    parser.add_argument("--epochs", type=int, default=5, help="per stage; the first is not timed")
    parser.add_argument("--stages", nargs="+", type=int, choices=(1, 2), default=[1, 2])
    parser.add_argument("--unfreeze-top", type=int, help="stage 2's k; default: tlfeat's for the backbone")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain-inputs", nargs="+", choices=tuple(PLAIN_INPUTS), default=list(PLAIN_INPUTS),
                        help="how the plain side is fed (each its own run)")
    parser.add_argument("--scene15", type=Path, default=SCENE15, help="Scene15 folder (its train/ is used)")
    args = parse_bench_args(
        parser, lambda kind, config: (_child_plain if kind == "plain" else _child_tlfeat)(json.loads(config))
    )
    if args is None:
        return

    from tlfeat.backbones import get_backbone
    from tlfeat.reports import markdown_table

    if args.epochs < 2:
        raise SystemExit("--epochs must be 2 or more: the first epoch of a stage (tracing) is not timed")
    if not (args.scene15 / "train").is_dir():
        raise SystemExit(f"Scene15 not found at {args.scene15}")
    spec = get_backbone(args.backbone)
    k = args.unfreeze_top if args.unfreeze_top is not None else spec.unfreeze_top
    if k is None:
        raise SystemExit(f"{spec.name}: give --unfreeze-top")
    command = bench_command()
    config = {
        "backbone": spec.name, "weights": args.weights, "image_size": args.image_size or spec.input_size,
        "epochs": args.epochs, "stages": sorted(set(args.stages)), "unfreeze_top": k,
        "batch_size": args.batch_size, "seed": args.seed,
    }
    with tempfile.TemporaryDirectory() as tmp:
        config["data"] = str(make_subset(args.scene15, args.classes, args.images, Path(tmp) / "scene15-subset"))
        plain = {
            name: run_isolated(__file__, "plain", json.dumps({**config, "input": name})) for name in args.plain_inputs
        }
        ours = run_isolated(__file__, "tlfeat", json.dumps({**config, "out": str(Path(tmp) / "run")}))

    report = {"command": command, "cpu_count": os.cpu_count(), "config": config, "plain": plain, "tlfeat": ours,
              "ratio": {}}
    rows = []
    for stage in map(str, config["stages"]):
        mine = ours["stages"][stage]
        what = "base frozen" if stage == "1" else f"top {k} unfrozen"
        for name, side in plain.items():
            theirs = side["stages"][stage]
            ratio = report["ratio"][f"stage{stage}_vs_{name}"] = mean(mine["epoch_s"]) / mean(theirs["epoch_s"])
            rows.append([
                f"{stage} ({what})", PLAIN_INPUTS[name], f"{mean(theirs['epoch_s']):.2f}",
                f"{mean(mine['epoch_s']):.2f}", f"{mean(mine['recorded_s'][1:]):.2f}", f"{ratio:.2f}x",
                "yes" if ratio <= TARGET else "NO", f"{theirs['first_epoch_s']:.1f} / {mine['first_epoch_s']:.1f}",
                f"{side['trainable_params'][stage]:,} / {ours['trainable_params'][stage]:,}",
            ])
    print(f"{spec.name}, weights {args.weights}, {config['image_size']} px, batch {args.batch_size}: "
          f"{ours['n_train']} train / {ours['n_val']} val images of {args.classes} Scene15 classes; "
          f"{args.epochs} epochs per stage, the first not timed\n")
    print(markdown_table(
        ["stage", "plain model.fit input", "plain s/epoch", "tlfeat s/epoch", "tlfeat own figure (no checkpoint)",
         "ratio tlfeat/plain", f"<= {TARGET:.2f}x", "1st epoch s plain / tlfeat", "trainable params plain / tlfeat"],
        rows,
    ), end="")
    print()
    finish_report(command, report, args.json)


if __name__ == "__main__":
    main()
