"""Fine-tuning: a backbone plus the study's head, trained end to end in two stages, resumable.

Stage 1 trains the head (Dense(128) -> Dropout(0.3) -> softmax) on the frozen
base; stage 2 starts from stage 1's best epoch, unfreezes the top k layers of
the base (``base.layers`` counted from the end, as the study did: 146 of
ResNet101's, 10 of VGG16's) and goes on at a lower learning rate. Images come
from the same scan and split as extract, decoded and preprocessed exactly as
extract does, by a threaded `keras.utils.PyDataset`, so no tf.data is needed
and any Keras backend works. The best checkpoint becomes ``model.keras`` when the run ends.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import __version__
from tlfeat.backbones import DEFAULT_BACKBONE, Backbone, build_model, get_backbone, weights_identity
from tlfeat.data.scan import DEFAULT_RATIOS, SPLITS, DatasetScan, scan_dataset
from tlfeat.errors import TlfeatError
from tlfeat.fileio import OutputLock
from tlfeat.finetuning.data import CROP_SCALE, check_trainable_split, dataset_fingerprint, image_batches_class
from tlfeat.finetuning.model import (
    base_of, build_finetune_model, compile_model, inference_mode_layer, jit_compile_setting, param_count,
    set_unfrozen_top,
)
from tlfeat.finetuning.runs import MODEL_NAME, RUN_FORMAT, RUN_FORMAT_VERSION, SUMMARY_NAME, load_finetuned, predict_with_model, read_run_summary
from tlfeat.finetuning.state import Log, Run, open_run
from tlfeat.reports import plot_confusion, plot_history, split_metrics, write_json
from tlfeat.runtime import accelerator_present, compute_policy


@functools.cache
def run_recorder_class() -> Any:
    """The RunRecorder callback class, created on first use."""
    import keras

    class RunRecorder(keras.callbacks.Callback):
        """After every epoch: history, best checkpoint, early stopping, last checkpoint and state.

        Keras' ModelCheckpoint, EarlyStopping and CSVLogger each keep their own
        state in memory and start afresh on every fit call; this one callback
        keeps it all in state.json so a resumed run carries on exactly.
        """

        def __init__(self, run: "Run", stage: int, dataset: Any) -> None:
            super().__init__()
            self.run = run
            self.stage = stage
            self.dataset = dataset
            self.started = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            # Before the workers fetch this epoch's first batch (Keras starts them after this callback).
            self.dataset.set_epoch(self.run.global_epochs())
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds = time.perf_counter() - self.started
            if self.run.record_epoch(self.model, self.stage, epoch + 1, logs or {}, seconds):
                self.model.stop_training = True

    return RunRecorder


@dataclass
class FinetuneSummary:
    out: Path
    summary: dict  # what summary.json holds
    resumed_from: tuple[int, int] | None = None  # (stage, epochs done in it) when --resume continued a run
    already_finished: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


def finetune(
    data: Path,
    backbone: str = DEFAULT_BACKBONE,
    weights: str = "imagenet",
    epochs1: int = 20,
    epochs2: int = 30,
    unfreeze_top: int | None = None,
    unfreeze_all: bool = False,
    lr1: float = 1e-3,
    lr2: float = 1e-5,
    batch_size: int = 32,
    image_size: int | None = None,
    augment: bool = False,
    seed: int = 0,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    patience: int = 10,
    out: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Log = print,
) -> FinetuneSummary:
    """Fine-tune `backbone` on the dataset at `data` in two stages; write (or continue) a run folder."""
    spec = get_backbone(backbone)
    requested = _requested_unfreeze(spec, unfreeze_top, unfreeze_all)
    _check_options(epochs1, epochs2, requested, batch_size, lr1, lr2, patience)
    size = image_size or spec.input_size
    if size < 32:
        raise TlfeatError(f"`image_size={size!r}`: must be at least 32 pixels")
    scan = scan_dataset(data, seed=seed, ratios=ratios)
    check_trainable_split(scan)
    config = {
        "backbone": spec.name,
        "weights": weights if weights in ("imagenet", "none") else str(Path(weights).resolve()),
        "weights_identity": weights_identity(spec, weights),
        "preprocessing": spec.preprocessing,
        "image_size": size,
        "unfreeze_top": requested,
        "epochs1": epochs1,
        "epochs2": epochs2,
        "lr1": lr1,
        "lr2": lr2,
        "batch_size": batch_size,
        "augment": augment,
        "patience": patience,
        "seed": seed,
        "split_ratios": list(scan.ratios),
        "dataset_root": str(scan.root),
        "dataset_fingerprint": dataset_fingerprint(scan),
        "classes": scan.class_names,
    }
    run = open_run(out, resume, config, scan, log)
    if run.state.get("finished"):
        summary = read_run_summary(run.out)
        return FinetuneSummary(run.out, summary, already_finished=True, skipped=sorted(run.failures.items()))

    on_gpu = accelerator_present()
    model, resumed_from = _load_or_build(run, spec, weights, on_gpu)
    n_layers = len(base_of(model).layers)
    k = n_layers if requested == "all" else requested
    if k > n_layers:
        raise TlfeatError(
            f"`unfreeze_top={k!r}`: {spec.name} has only {n_layers} layers; use `unfreeze_all` to train them all"
        )
    config["base_layers"] = n_layers

    with OutputLock(run.out / "run"):
        run.save_state()
        jit_compile = jit_compile_setting(on_gpu)
        try:
            _train(run, model, scan, spec, k, jit_compile, progress)
        except KeyboardInterrupt:
            raise TlfeatError(
                f"interrupted; {run.global_epochs()} finished epochs are saved in {run.out}: "
                f"rerun with `resume` `out={str(run.out)!r}` and the same options to continue"
            ) from None
        summary = _finish(run, scan, spec, on_gpu, jit_compile)
    return FinetuneSummary(run.out, summary, resumed_from, skipped=sorted(run.failures.items()))


def _requested_unfreeze(spec: Backbone, unfreeze_top: int | None, unfreeze_all: bool) -> int | str:
    """How many base layers stage 2 trains: a count, or "all"."""
    if unfreeze_all:
        if unfreeze_top is not None:
            raise TlfeatError("`unfreeze_top` and `unfreeze_all` exclude each other; give one")
        return "all"
    if unfreeze_top is None:
        if spec.unfreeze_top is None:
            raise TlfeatError(
                f"{spec.name}: no default layer count to unfreeze; give `unfreeze_top` K or `unfreeze_all`"
            )
        return spec.unfreeze_top
    if unfreeze_top < 0:
        raise TlfeatError(f"`unfreeze_top={unfreeze_top!r}`: must be 0 or more")
    return unfreeze_top


def _check_options(
    epochs1: int, epochs2: int, requested: int | str, batch_size: int, lr1: float, lr2: float, patience: int
) -> None:
    if epochs1 < 0 or epochs2 < 0:
        raise TlfeatError(f"`epochs1={epochs1!r}` `epochs2={epochs2!r}`: epoch counts cannot be negative")
    if epochs1 + (epochs2 if requested != 0 else 0) == 0:
        raise TlfeatError("nothing to train: `epochs1` is 0 and stage 2 has no epochs or no unfrozen layers")
    if batch_size < 1:
        raise TlfeatError(f"`batch_size={batch_size!r}`: must be at least 1")
    if not (lr1 > 0 and lr2 > 0):
        raise TlfeatError(f"`lr1={lr1!r}` `lr2={lr2!r}`: learning rates must be positive")
    if patience < 0:
        raise TlfeatError(f"`patience={patience!r}`: must be 0 (off) or more")


def _load_or_build(run: Run, spec: Backbone, weights: str, on_gpu: bool) -> tuple[Any, tuple[int, int] | None]:
    """The model to train: the run's last checkpoint, or a new one. Also (stage, epoch) resumed after."""
    import keras

    checkpoint = run.last_checkpoint()
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise TlfeatError(f"{run.out}: its state names {checkpoint.name}, which is missing; cannot resume")
        inference_mode_layer()  # registered for loading
        model = keras.saving.load_model(checkpoint)
        last = run.state["history"][-1]
        run.log(
            f"resuming {run.out} after stage {last['stage']} epoch {last['epoch']} "
            f"(epoch {last['global_epoch']} in all)"
        )
        return model, (last["stage"], last["epoch"])
    config = run.config
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(compute_policy(on_gpu))
    try:
        base = build_model(spec, weights, config["image_size"])
        keras.utils.set_random_seed(config["seed"])  # build_model seeds random bases itself; this seeds the head
        return build_finetune_model(base, len(config["classes"]), config["image_size"], spec.name), None
    finally:
        keras.config.set_dtype_policy(previous)


def _train(
    run: Run, model: Any, scan: DatasetScan, spec: Backbone, k: int, jit_compile: Any, progress: bool
) -> None:
    """Run what is left of stage 1 (head only) and stage 2 (top k base layers too)."""
    import keras

    config = run.config
    image_batches, recorder = image_batches_class(), run_recorder_class()

    def batches(split: str) -> Any:
        entries = [e for e in scan.entries if e.split == split]
        training = split == "train"
        return image_batches(
            [scan.root / e.relpath for e in entries], np.array([scan.label_of(e) for e in entries]),
            config["image_size"], spec.preprocess, config["batch_size"], config["seed"], shuffle=training,
            augment=config["augment"] and training, on_failure=run.note_failure,
        )

    train_data, val_data = batches("train"), batches("val")
    n_layers = config["base_layers"]
    for stage, unfrozen, lr in ((1, 0, config["lr1"]), (2, k, config["lr2"])):
        planned = config[f"epochs{stage}"]
        stage_state = run.stage_state(stage)
        if stage_state["stopped_early"] or stage_state["epochs_run"] >= planned or (stage == 2 and k == 0):
            continue
        # A resumed stage keeps the checkpoint's trainable layers and compiled optimizer (with its state).
        if stage_state["epochs_run"] == 0:
            if stage == 2:
                _restore_best_of_stage_1(run, model)
            set_unfrozen_top(model, unfrozen)
            compile_model(model, lr, jit_compile)
            stage_state.update(
                trainable_params=param_count(model.trainable_weights),
                non_trainable_params=param_count(model.non_trainable_weights),
                learning_rate=lr,
            )
        if unfrozen == 0:
            what = "base frozen, head trains"
        elif unfrozen < n_layers:
            what = f"top {unfrozen} of {n_layers} base layers unfrozen"
        else:
            what = "whole base unfrozen"
        run.log(
            f"stage {stage}: {what}, BatchNorm in inference mode; trainable params "
            f"{stage_state['trainable_params']:,}, non-trainable {stage_state['non_trainable_params']:,}; "
            f"RMSprop lr {lr:g}; epochs {stage_state['epochs_run'] + 1}-{planned}"
        )
        keras.utils.set_random_seed(config["seed"] + run.global_epochs())
        model.fit(
            train_data, validation_data=val_data, epochs=planned, initial_epoch=stage_state["epochs_run"],
            shuffle=False,  # ImageBatches shuffles, seeded; Keras' own shuffle would not be
            callbacks=[recorder(run, stage, train_data)], verbose=1 if progress else 0,
        )


def _restore_best_of_stage_1(run: Run, model: Any) -> None:
    """Start stage 2 from stage 1's best epoch: later stage-1 epochs only overfit the head (early stopping lets
    them run `patience` epochs past the best), and fine-tuning the base on top of that starts from a worse point."""
    import keras

    best = run.state.get("best")
    last = run.state["history"][-1] if run.state["history"] else None
    if not best or best["stage"] != 1 or last is None or last["global_epoch"] == best["global_epoch"]:
        return
    inference_mode_layer()  # registered for loading
    best_model = keras.saving.load_model(run.checkpoints / best["file"], compile=False)
    model.set_weights(best_model.get_weights())
    run.log(
        f"stage 2 starts from stage 1's best epoch {best['epoch']} (val acc {best['val_accuracy']:.3f}, "
        f"val loss {best['val_loss']:.4f}), not its last ({last['epoch']})"
    )


def _finish(run: Run, scan: DatasetScan, spec: Backbone, on_gpu: bool, jit_compile: Any) -> dict:
    """Score the best model on every split, write the reports and summary.json, drop the resume files."""
    import keras

    config = run.config
    best = run.state["best"]
    best_file = run.checkpoints / best["file"]
    if best_file.exists():  # absent when an earlier _finish was killed after this move
        os.replace(best_file, run.out / MODEL_NAME)
    model = load_finetuned(run.out, summary_required=False)[0]
    run.log(
        f"best epoch: stage {best['stage']} epoch {best['epoch']} (val acc {best['val_accuracy']:.3f}); "
        "scoring every split"
    )
    metrics = {}
    for split in SPLITS:
        entries = [e for e in scan.entries if e.split == split]
        if not entries:
            continue
        files = [scan.root / e.relpath for e in entries]
        predicted = predict_with_model(model, files, config["image_size"], spec, config["batch_size"])
        proba, ok = predicted.outputs, predicted.ok
        for path, reason in predicted.failures:
            run.note_failure(Path(path), reason)
        labels = np.array([scan.label_of(entries[i]) for i in ok], dtype=np.int64)
        metrics[split] = split_metrics(labels, np.argmax(proba, axis=1), scan.class_names)
    write_json(run.out / "metrics.json", {"model": MODEL_NAME, "classes": scan.class_names, "splits": metrics})
    shown = "test" if "test" in metrics else list(metrics)[-1]
    plot_confusion(
        np.array(metrics[shown]["confusion_matrix"]), scan.class_names,
        f"{spec.name} fine-tuned ({_method(config)}): {shown} accuracy {metrics[shown]['accuracy']:.3f}",
        run.out / "confusion.png",
    )
    title = f"{scan.name}: {spec.name} {_method(config)}"
    plot_history(run.state["history"], run.stage2_start(), run.out / "training.png", title)

    kept = ("epochs_run", "stopped_early", "trainable_params", "non_trainable_params", "learning_rate", "seconds")
    stages = {
        stage: {"epochs_planned": config[f"epochs{stage}"], **{k: recorded[k] for k in kept}}
        for stage, recorded in run.state["stages"].items()
    }
    summary = {
        "format": RUN_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        **{k: v for k, v in config.items() if k not in ("epochs1", "epochs2")},
        "method": _method(config),
        "dataset": scan.name,
        "split_counts": scan.split_counts(),
        "stages": stages,
        "trainable_params": max((s["trainable_params"] or 0) for s in stages.values()),
        "best_epoch": {k: v for k, v in best.items() if k != "file"},
        "seconds": run.state["seconds"],
        "scores": {s: {k: m[k] for k in ("n", "accuracy", "macro_f1")} for s, m in metrics.items()},
        "batchnorm": (
            "inference mode throughout: moving statistics stay the pretrained ones; "
            "gamma/beta of unfrozen BatchNorm layers train"
        ),
        "augmentation": (
            f"train only: random crop of {CROP_SCALE[0]:g}-{CROP_SCALE[1]:g} of the side, resized back; "
            "horizontal flip" if config["augment"] else None
        ),
        "compute": compute_policy(on_gpu),
        "jit_compile": jit_compile,
        "keras_backend": keras.backend.backend(),
        "skipped": dict(sorted(run.failures.items())),
        "tlfeat_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(run.out / SUMMARY_NAME, summary)
    run.state["finished"] = True
    run.state["last_checkpoint"] = None
    run.save_state()
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    return summary


def _method(config: dict) -> str:
    k = config["unfreeze_top"]
    if config["epochs2"] == 0 or k == 0:
        return "head on frozen base"
    return "fine-tuned, whole base" if k == "all" or k == config.get("base_layers") else f"fine-tuned, top {k} layers"
