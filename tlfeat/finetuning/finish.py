"""The end of a fine-tune run: score the best epoch, write the reports, then mark the run finished.

The steps run in an order that a kill at any point leaves a run `--resume` completes:
the best checkpoint is scored where it lies and only *copied* to ``model.keras``;
``summary.json`` (what predict and compare read) comes after every other file;
the state says "finished" after that, and only then are the checkpoints removed.
Until the state says finished, resuming reruns these steps from the checkpoints,
which are still there; each step replaces its file atomically.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat import __version__
from tlfeat.backbones import Backbone
from tlfeat.data.scan import SPLITS, DatasetScan
from tlfeat.errors import TlfeatError
from tlfeat.fileio import atomic_write_bytes, sha256_file
from tlfeat.finetuning.data import CROP_SCALE
from tlfeat.finetuning.model import inference_mode_layer, save_model_atomically, with_probabilities
from tlfeat.finetuning.runs import (
    MODEL_NAME, RUN_FORMAT, RUN_FORMAT_VERSION, SUMMARY_NAME, TEST_OUTCOMES_NAME, describe_saved_model,
    predict_with_model,
)
from tlfeat.finetuning.state import Run
from tlfeat.heads.rows import image_keys
from tlfeat.reports import ImageOutcomes, plot_confusion, plot_history, split_metrics, write_json
from tlfeat.runtime import compute_policy


def finish_run(run: Run, scan: DatasetScan, spec: Backbone, on_gpu: bool, jit_compile: Any) -> dict:
    """Score the best model on every split, write the reports, model.keras and summary.json, drop the checkpoints."""
    import keras

    config, best = run.config, run.state.best
    best_file = run.checkpoints / best.file
    if not best_file.is_file():
        raise TlfeatError(f"{run.out}: its state names {best_file.name}, which is missing; cannot finish this run")
    inference_mode_layer()  # registered for loading
    model = with_probabilities(keras.saving.load_model(best_file, compile=False))
    run.log(
        f"best epoch: stage {best.stage} epoch {best.epoch} (val acc {best.val_accuracy:.3f}); scoring every split"
    )
    metrics, readable, notes, test = {}, {}, [], None
    seen: set[str] = set()  # contents of the images trained on (train), then also selected on (val)
    for split in SPLITS:
        entries = [e for e in scan.entries if e.split == split]
        if not entries:
            continue
        files = [scan.root / e.relpath for e in entries]
        predicted = predict_with_model(model, files, config.image_size, spec, config.batch_size)
        for path, reason in predicted.failures:
            run.note_failure(Path(path), reason)
        labels = np.array([scan.label_of(entries[i]) for i in predicted.ok], dtype=np.int64)
        contents = [_content_key(files[i]) for i in predicted.ok]
        # A val or test image whose bytes are those of an image the run trained (or chose its epoch) on would
        # score what the model memorised: left out, as fit-head and evaluate leave copies out.
        unseen = np.array([split == "train" or key not in seen for key in contents], dtype=bool)
        readable[split] = len(predicted.ok)
        seen.update(key for key in contents if key is not None)
        if not unseen.all():
            roles = "trained on" if split == "val" else "trained or chose its best epoch on"
            notes.append(f"{split}: {int((~unseen).sum())} images left out of the score, copies (the same bytes) "
                         f"of images the run {roles}" + ("; none left, so no score" if not unseen.any() else ""))
            run.log(f"note: {notes[-1]}")
        elif not unseen.any():
            notes.append(f"{split}: none of its {len(entries)} images could be read, so no score")
            run.log(f"note: {notes[-1]}")
        if not unseen.any():  # a split left with nothing is not scored, as evaluate does
            continue
        classes = np.argmax(predicted.outputs, axis=1)[unseen]
        metrics[split] = split_metrics(labels[unseen], classes, scan.class_names)
        if split == "test":
            scored = [entries[i] for i, kept in zip(predicted.ok, unseen) if kept]
            test = ImageOutcomes(image_keys([e.relpath for e in scored], [e.size for e in scored]), labels[unseen], classes)
    write_json(run.out / "metrics.json", {"model": MODEL_NAME, "classes": scan.class_names, "splits": metrics})
    if test is not None:
        atomic_write_bytes(run.out / TEST_OUTCOMES_NAME, test.to_npz())
    summary = run_summary(run, scan, metrics, readable, notes, on_gpu, jit_compile, keras.backend.backend())
    shown = "test" if "test" in metrics else list(metrics)[-1]
    plot_confusion(  # of the best epoch's model: its method, which may be stage 1's
        np.array(metrics[shown]["confusion_matrix"]), scan.class_names,
        f"{spec.name} ({summary['method']}): {shown} accuracy {metrics[shown]['accuracy']:.3f}",
        run.out / "confusion.png",
    )
    history = [vars(e) for e in run.state.history]
    plot_history(history, run.stage2_start(), run.out / "training.png", f"{scan.name}: {spec.name} {config.method()}")
    save_model_atomically(model, run.out / MODEL_NAME)  # the checkpoint stays until the run is finished

    write_json(run.out / SUMMARY_NAME, summary)
    run.state.finished = True
    run.state.last_checkpoint = None
    run.save_state()
    shutil.rmtree(run.checkpoints, ignore_errors=True)
    return summary


def _content_key(path: Path) -> str | None:
    """A digest of the file's bytes (None if it cannot be read again: then it matches nothing)."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def run_summary(run: Run, scan: DatasetScan, metrics: dict, readable: dict[str, int], notes: list[str], on_gpu: bool,
                jit_compile: Any, backend: str) -> dict:
    """What summary.json holds: the config, per-stage record, best epoch, scores, environment, and the method and
    trainable parameters of the model saved (the best epoch's: stage 1's head alone when it is in stage 1)."""
    config, state = run.config, run.state
    kept = ("epochs_run", "stopped_early", "trainable_params", "non_trainable_params", "learning_rate", "seconds")
    stages = {
        str(stage): {"epochs_planned": config.epochs(stage), **{k: getattr(recorded, k) for k in kept}}
        for stage, recorded in state.stages.items()
    }
    return describe_saved_model({
        "format": RUN_FORMAT,
        "format_version": RUN_FORMAT_VERSION,
        **{k: v for k, v in vars(config).items() if k not in ("epochs1", "epochs2")},
        "method": config.method(),
        "dataset": scan.name,
        "split_counts": readable,  # readable images, as extract counts them
        "stages": stages,
        "trainable_params": max((s["trainable_params"] or 0) for s in stages.values()),
        "best_epoch": {k: v for k, v in vars(state.best).items() if k != "file"},
        "seconds": state.seconds,
        "scores": {s: {k: m[k] for k in ("n", "accuracy", "macro_f1")} for s, m in metrics.items()},
        "notes": notes,  # images left out of a score
        "batchnorm": (
            "inference mode throughout: moving statistics stay the pretrained ones; "
            "gamma/beta of unfrozen BatchNorm layers train"
        ),
        "augmentation": (
            f"train only: random crop of {CROP_SCALE[0]:g}-{CROP_SCALE[1]:g} of the side, resized back; "
            "horizontal flip" if config.augment else None
        ),
        "compute": compute_policy(on_gpu),
        "jit_compile": jit_compile,
        "keras_backend": backend,
        "skipped": dict(sorted(run.failures.items())),
        "tlfeat_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })
