"""Fine-tuning: a backbone plus the study's head, trained end to end in two stages, resumable.

Stage 1 trains the head (Dense(128) -> Dropout(0.3) -> softmax) on the frozen
base; stage 2 starts from stage 1's best epoch, unfreezes the top k layers of
the base (``base.layers`` counted from the end, as the study did: 146 of
ResNet101's, 10 of VGG16's) and goes on at a lower learning rate. Images come
from the same scan and split as extract, decoded and preprocessed exactly as
extract does, by a threaded `keras.utils.PyDataset`, so no tf.data is needed
and any Keras backend works. The best checkpoint becomes ``model.keras`` when the run ends
(`tlfeat.finetuning.finish`).

A resumed run equals an uninterrupted one: each epoch's data order and
augmentation are functions of (seed, epoch, image), the optimizer state is in the
checkpoint, and each epoch starts Keras' random draws (dropout masks) from
(seed, epoch), since Keras does not save its seed generators in checkpoints.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat.backbones import Backbone, build_model, get_backbone, weights_identity, weights_source
from tlfeat.data.scan import DatasetScan, scan_dataset
from tlfeat.errors import Interrupted, TlfeatError, integer, number, seed_value
from tlfeat.fileio import path_value
from tlfeat.finetuning.data import check_trainable_split, dataset_fingerprint, image_batches_class
from tlfeat.finetuning.finish import finish_run
from tlfeat.finetuning.model import (
    base_of, build_finetune_model, compile_model, inference_mode_layer, jit_compile_setting, param_count, reseed,
    set_unfrozen_top, top_with_weights,
)
from tlfeat.finetuning.options import DEFAULT_OPTIONS
from tlfeat.finetuning.runs import read_run_summary, run_lock
from tlfeat.finetuning.state import (
    Log, Run, RunConfig, find_resumable, open_run, recorded_options, run_prefix,
)
from tlfeat.heads.keras_head import skip_single_replica_sum
from tlfeat.interrupts import deferred_interrupts, raise_if_requested
from tlfeat.progress import progress_bar
from tlfeat.runtime import accelerator_present, check_batch_size, compute_policy
from tlfeat.seeding import caller_streams_kept


@functools.cache
def run_recorder_class() -> Any:
    """The RunRecorder callback class, created on first use."""
    import keras

    class RunRecorder(keras.callbacks.Callback):
        """Every epoch: its random state at the start; a progress bar; then history, best checkpoint,
        early stopping, last checkpoint, state and one line.

        Keras' ModelCheckpoint, EarlyStopping and CSVLogger each keep their own
        state in memory and start afresh on every fit call; this one callback
        keeps it all in state.json so a resumed run carries on exactly. Keras' own
        progress bar is off: it printed each epoch's numbers a second time, and
        its last update ran into the epoch's line.
        """

        def __init__(self, run: "Run", stage: int, dataset: Any, progress: bool) -> None:
            super().__init__()
            self.run = run
            self.stage = stage
            self.dataset = dataset
            self.progress = progress
            self.bar: Any = None
            self.started = 0.0

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            # Before the workers fetch this epoch's first batch (Keras starts them after this callback).
            done = self.run.global_epochs()
            self.dataset.set_epoch(done)
            reseed(self.model, self.run.config.seed, done)
            planned = self.run.config.epochs(self.stage)
            self.bar = progress_bar(len(self.dataset), self.progress, f"stage {self.stage} epoch {epoch + 1}/{planned}",
                                    unit="batch", leave=False)
            self.started = time.perf_counter()

        # Ctrl-C is deferred to these checks (`_train`): Keras turns each batch's logs into numbers inside a
        # bare `except: pass`, and under JAX that is where the main thread waits for the step to finish, so a
        # KeyboardInterrupt raised there was swallowed and the run trained on. Raised here, it leaves `fit`.
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.bar.update(1)
            raise_if_requested()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            seconds = time.perf_counter() - self.started
            self.bar.close()  # erased, so the epoch's line starts clean
            if self.run.record_epoch(self.model, self.stage, epoch + 1, logs or {}, seconds):
                self.model.stop_training = True
            raise_if_requested()  # Ctrl-C during validation: after the epoch is saved

    return RunRecorder


@dataclass
class FinetuneSummary:
    """A fine-tune run: its folder `out`, `summary` (summary.json: scores, best epoch, settings),
    where a resumed run continued from, whether it had already finished, and the images skipped."""

    out: Path
    summary: dict  # what summary.json holds
    resumed_from: tuple[int, int] | None = None  # (stage, epochs done in it) when --resume continued a run
    already_finished: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)

    def __repr__(self) -> str:  # summary.json whole would fill a notebook cell
        accuracy = self.summary.get("scores", {}).get("test", {}).get("accuracy")
        scored = f"test accuracy {accuracy:.4f}" if accuracy is not None else "no test split"
        return (f"FinetuneSummary(out={str(self.out)!r}, {self.summary.get('method', '?')}, {scored}, "
                f"{len(self.skipped)} images skipped)")


@caller_streams_kept()  # it seeds Keras, so `random` and `np.random`, at the start and at each epoch
def finetune(
    data: str | Path,
    backbone: str | None = None,
    weights: str | None = None,
    epochs1: int | None = None,
    epochs2: int | None = None,
    unfreeze_top: int | None = None,
    unfreeze_all: bool = False,
    lr1: float | None = None,
    lr2: float | None = None,
    batch_size: int | None = None,
    image_size: int | None = None,
    augment: bool | None = None,
    seed: int | None = None,
    ratios: tuple[float, float, float] | None = None,
    patience: int | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Log = print,
) -> FinetuneSummary:
    """Fine-tune `backbone` (default efficientnet_lite0) on the dataset at `data` in two stages; write (or
    continue) a run folder. An option left at None takes its default (`DEFAULT_OPTIONS`), or with `resume`
    the run's own: give one again only to change it where a resume allows (more epochs, another patience).

    Stage 1 trains the study's head (Dense 128, Dropout 0.3, softmax) on the frozen base for `epochs1`
    epochs with RMSprop at `lr1`; stage 2 starts from stage 1's best epoch, unfreezes the base's last
    `unfreeze_top` layers (default: the study's 146 for ResNet101 and 10 for VGG16, 47 for Lite0; other
    backbones need it; 0 skips stage 2), or all with `unfreeze_all`, and trains on for `epochs2` epochs
    at `lr2`. Each stage stops after `patience` epochs without a lower val loss (0: never); the best
    checkpoint becomes the run's model.keras. `augment` adds seeded training-only random crops and
    horizontal flips. data, seed, ratios: the dataset and split, exactly as `extract` scans and splits them.
    weights: "imagenet", "none" or a Keras weights file. image_size: default the backbone's own.
    batch_size: images per training step. progress: a bar per epoch.
    out: the run folder, default ``runs/<dataset>-<backbone>-top<K>-<timestamp>/``; `resume` continues an
    interrupted run there (default: the newest matching run in runs/) and gives the result an
    uninterrupted run would. `log` receives the per-epoch lines.

    Ctrl-C raises `tlfeat.Interrupted`: finished epochs are kept; `resume` continues.
    """
    path_value("data", data)
    out = None if out is None else path_value("out", out)
    if unfreeze_all and unfreeze_top is not None:
        raise TlfeatError("`unfreeze_top` and `unfreeze_all` exclude each other; give one")
    given = {name: value for name, value in (
        ("backbone", backbone), ("weights", weights), ("epochs1", epochs1), ("epochs2", epochs2), ("lr1", lr1),
        ("lr2", lr2), ("batch_size", batch_size), ("image_size", image_size), ("augment", augment), ("seed", seed),
        ("ratios", ratios), ("patience", patience), ("unfreeze_top", "all" if unfreeze_all else unfreeze_top),
    ) if value is not None}
    if resume and out is None:  # the newest unfinished run of this dataset, backbone and unfrozen layers
        spec = get_backbone(given.get("backbone", DEFAULT_OPTIONS["backbone"]))
        out = find_resumable(run_prefix(Path(data).resolve().name, spec.name,
                                        _requested_unfreeze(spec, given.get("unfreeze_top"))))
    options = {**DEFAULT_OPTIONS, **(recorded_options(out) if resume else {}), **given}
    spec = get_backbone(options["backbone"])
    weights = options["weights"]
    requested = _requested_unfreeze(spec, options.get("unfreeze_top"))
    epochs1, epochs2, batch_size, lr1, lr2, patience = _checked_options(
        options["epochs1"], options["epochs2"], requested, options["batch_size"], options["lr1"], options["lr2"],
        options["patience"])
    size = spec.input_size if options.get("image_size") is None else integer("image_size", options["image_size"], 32)
    seed = seed_value(options["seed"])
    augment = options["augment"]
    scan = scan_dataset(data, seed=seed, ratios=options["ratios"])
    check_trainable_split(scan)
    import keras  # the backend a run trains under is part of its config: a resume must not switch it

    config = RunConfig(
        backbone=spec.name,
        weights=weights_source(weights),
        weights_identity=weights_identity(spec, weights),
        preprocessing=spec.preprocessing,
        image_size=size,
        unfreeze_top=requested,
        epochs1=epochs1,
        epochs2=epochs2,
        lr1=lr1,
        lr2=lr2,
        batch_size=batch_size,
        augment=augment,
        patience=patience,
        seed=seed,
        split_ratios=list(scan.ratios),
        dataset_root=str(scan.root),
        dataset_fingerprint=dataset_fingerprint(scan),
        classes=scan.class_names,
        keras_backend=keras.backend.backend(),
    )
    run = open_run(out, resume, config, scan, log)
    folder_was_new = not run.out.exists()
    try:
        with run_lock(run.out):  # before the model is built, so that a second run on this folder stops at once
            return _finetune_locked(run, scan, spec, weights, requested, progress)
    finally:
        if folder_was_new:
            with contextlib.suppress(OSError):
                run.out.rmdir()  # only if empty: a run refused before its first file leaves no folder


def _finetune_locked(
    run: Run, scan: DatasetScan, spec: Backbone, weights: str, requested: int | str, progress: bool
) -> FinetuneSummary:
    """`finetune` once its run folder is locked: build or load the model, train, finish."""
    run.remove_stale_temporaries()
    if run.state.finished:
        shutil.rmtree(run.checkpoints, ignore_errors=True)  # left when a kill came after the state said finished
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
    run.config.base_layers = n_layers
    run.save_state()
    jit_compile = jit_compile_setting(on_gpu)
    try:
        with deferred_interrupts():
            _train(run, model, scan, spec, k, jit_compile, progress)
        summary = finish_run(run, scan, spec, on_gpu, jit_compile)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; {run.global_epochs()} finished epochs are saved in {run.out}: "
            f"rerun with `resume` `out={str(run.out)!r}` to continue (the run keeps its options)"
        ) from None
    return FinetuneSummary(run.out, summary, resumed_from, skipped=sorted(run.failures.items()))


def _requested_unfreeze(spec: Backbone, unfreeze_top: int | str | None) -> int | str:
    """How many base layers stage 2 trains: a count, or "all" (`unfreeze_all`); None: the backbone's default."""
    if unfreeze_top == "all":
        return "all"
    if unfreeze_top is None:
        if spec.unfreeze_top is None:
            raise TlfeatError(
                f"{spec.name}: no default layer count to unfreeze; give `unfreeze_top` K or `unfreeze_all`"
            )
        return spec.unfreeze_top
    return integer("unfreeze_top", unfreeze_top, 0)


def _checked_options(
    epochs1: int, epochs2: int, requested: int | str, batch_size: int, lr1: float, lr2: float, patience: int
) -> tuple[int, int, int, float, float, int]:
    """The options as Python numbers, or a one-line error for the first that is out of range."""
    epochs1, epochs2 = integer("epochs1", epochs1, 0), integer("epochs2", epochs2, 0)
    if epochs1 + (epochs2 if requested != 0 else 0) == 0:
        raise TlfeatError("nothing to train: `epochs1` is 0 and stage 2 has no epochs or no unfrozen layers")
    for name, rate in (("lr1", lr1), ("lr2", lr2)):
        if not number(name, rate) > 0:
            raise TlfeatError(f"`{name}={rate!r}`: learning rates must be positive")
    return epochs1, epochs2, check_batch_size(batch_size), float(lr1), float(lr2), integer("patience", patience, 0)


def _load_or_build(run: Run, spec: Backbone, weights: str, on_gpu: bool) -> tuple[Any, tuple[int, int] | None]:
    """The model to train: the run's last checkpoint, or a new one. Also (stage, epoch) resumed after."""
    import keras

    checkpoint = run.last_checkpoint()
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise TlfeatError(f"{run.out}: its state names {checkpoint.name}, which is missing; cannot resume")
        inference_mode_layer()  # registered for loading
        model = keras.saving.load_model(checkpoint)
        skip_single_replica_sum(model.optimizer)  # as `rmsprop` does for a new stage
        last = run.state.history[-1]
        run.log(f"resuming {run.out} after stage {last.stage} epoch {last.epoch} (epoch {last.global_epoch} in all)")
        return model, (last.stage, last.epoch)
    config = run.config
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(compute_policy(on_gpu))
    try:
        base = build_model(spec, weights, config.image_size)
        keras.utils.set_random_seed(config.seed)  # build_model seeds random bases itself; this seeds the head
        return build_finetune_model(base, len(config.classes), config.image_size, spec.name), None
    finally:
        keras.config.set_dtype_policy(previous)


def _train(
    run: Run, model: Any, scan: DatasetScan, spec: Backbone, k: int, jit_compile: Any, progress: bool
) -> None:
    """Run what is left of stage 1 (head only) and stage 2 (top k base layers too)."""
    config = run.config
    image_batches, recorder = image_batches_class(), run_recorder_class()

    def batches(split: str) -> Any:
        entries = [e for e in scan.entries if e.split == split]
        training = split == "train"
        return image_batches(
            [scan.root / e.relpath for e in entries], np.array([scan.label_of(e) for e in entries]),
            config.image_size, spec.preprocess, config.batch_size, config.seed, shuffle=training,
            augment=config.augment and training, on_failure=run.note_failure,
        )

    train_data, val_data = batches("train"), batches("val")
    n_layers = config.base_layers
    for stage, unfrozen, lr in ((1, 0, config.lr1), (2, k, config.lr2)):
        planned = config.epochs(stage)
        stage_state = run.stage_state(stage)
        if stage_state.stopped_early or stage_state.epochs_run >= planned or (stage == 2 and k == 0):
            continue
        # A resumed stage keeps the checkpoint's trainable layers and compiled optimizer (with its state).
        if stage_state.epochs_run == 0:
            if stage == 2:
                _restore_best_of_stage_1(run, model)
            set_unfrozen_top(model, unfrozen)
            compile_model(model, lr, jit_compile)
            stage_state.trainable_params = param_count(model.trainable_weights)
            stage_state.non_trainable_params = param_count(model.non_trainable_weights)
            stage_state.learning_rate = lr
        if unfrozen == 0:
            what = "base frozen, head trains"
        elif unfrozen < n_layers:
            what = f"top {unfrozen} of {n_layers} base layers unfrozen"
        else:
            what = "whole base unfrozen"
        if stage == 2 and stage_state.trainable_params == run.stage_state(1).trainable_params:
            what += (f" (none of them holds weights, so the head alone trains on; the top {top_with_weights(model)} "
                     "reach the first that does)")
        run.log(
            f"stage {stage}: {what}, BatchNorm in inference mode; trainable params "
            f"{stage_state.trainable_params:,}, non-trainable {stage_state.non_trainable_params:,}; "
            f"RMSprop lr {lr:g}; epochs {stage_state.epochs_run + 1}-{planned}"
        )
        model.fit(
            train_data, validation_data=val_data, epochs=planned, initial_epoch=stage_state.epochs_run,
            shuffle=False,  # ImageBatches shuffles, seeded; Keras' own shuffle would not be
            callbacks=[recorder(run, stage, train_data, progress)], verbose=0,
        )


def _restore_best_of_stage_1(run: Run, model: Any) -> None:
    """Start stage 2 from stage 1's best epoch: later stage-1 epochs only overfit the head (early stopping lets
    them run `patience` epochs past the best), and fine-tuning the base on top of that starts from a worse point."""
    import keras

    best = run.state.best
    last = run.state.history[-1] if run.state.history else None
    if not best or best.stage != 1 or last is None or last.global_epoch == best.global_epoch:
        return
    inference_mode_layer()  # registered for loading
    best_model = keras.saving.load_model(run.checkpoints / best.file, compile=False)
    model.set_weights(best_model.get_weights())
    run.log(
        f"stage 2 starts from stage 1's best epoch {best.epoch} (val acc {best.val_accuracy:.3f}, "
        f"val loss {best.val_loss:.4f}), not its last ({last.epoch})"
    )
