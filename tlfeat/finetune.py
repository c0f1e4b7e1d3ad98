"""Fine-tuning: a backbone plus the study's head, trained end to end in two stages, resumable.

Stage 1 trains the head (Dense(128) -> Dropout(0.3) -> softmax) on the frozen
base; stage 2 starts from stage 1's best epoch, unfreezes the top k layers of
the base (``base.layers`` counted from the end, as the study did: 146 of
ResNet101's, 10 of VGG16's) and goes on at a lower learning rate. Images come
from the same scan and split as extract, decoded and preprocessed exactly as
extract does, by a threaded
`keras.utils.PyDataset`, so no tf.data is needed and any Keras backend works.

BatchNorm: the base always runs in inference mode, unfrozen or not, so its
moving mean and variance stay the pretrained ones and only gamma/beta of
unfrozen BatchNorm layers learn. Small fine-tuning batches would otherwise
replace the ImageNet statistics with noisy ones and wreck the features. Keras 3
makes this easy to get wrong: ``base(x, training=False)`` inside a functional
model is overridden by ``fit``'s training=True (keras-team/keras#20285), so the
base is wrapped in `InferenceMode`, a layer with no `training` argument to
override.

Run folder: ``model.keras`` (best epoch by val accuracy), ``history.csv`` and
``history.json``, ``training.png``, ``metrics.json`` (per split: per-class scores
and confusion matrix), ``confusion.png`` (test split) and ``summary.json``.
While running, ``checkpoints/`` holds the best epoch so far and the latest one
(model and optimizer, ``.keras``) and ``state.json`` names them; all are
replaced atomically after every epoch, so ``--resume`` after Ctrl-C or a kill
continues from the last finished epoch. The best checkpoint becomes
``model.keras`` when the run ends.

Keras is imported only when a model is built or loaded, so `tlfeat.compare` can
read run summaries without paying for it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tlfeat import __version__
from tlfeat.backbones import DEFAULT_BACKBONE, Backbone, build_model, get_backbone, weights_identity
from tlfeat.cache import OutputLock
from tlfeat.dataset import DEFAULT_RATIOS, SPLIT_DIRS, DatasetScan, scan_dataset
from tlfeat.decode import DecodeError, decode_image, default_workers, iter_batches
from tlfeat.errors import TlfeatError
from tlfeat.extract import accelerator_present, compute_policy
from tlfeat.fileio import atomic_write_bytes, check_format, describe_exception, read_json_object
from tlfeat.reports import plot_confusion, split_metrics, write_csv, write_json

RUN_FORMAT = "tlfeat-finetune"
RUN_FORMAT_VERSION = 1
SUMMARY_NAME = "summary.json"
MODEL_NAME = "model.keras"
STATE_NAME = "state.json"
RUNS_DIR = Path("runs")  # default parent of run folders: runs/<dataset>-<backbone>-top<k>-<timestamp>

# The study's values for ResNet101 and VGG16. For Lite0: stages 6-7 and the
# head (from block6a_expand_conv), a comparable top share of the network.
DEFAULT_UNFREEZE_TOP = {"resnet101": 146, "vgg16": 10, "efficientnet_lite0": 47}
HIDDEN_UNITS = 128  # the study's head, as in tlfeat.heads.KerasReportHead
DROPOUT = 0.3
CROP_SCALE = (0.75, 1.0)  # --augment: side of the random crop, as a share of the image side
HISTORY_FIELDS = (
    "global_epoch", "stage", "epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds",
)
# Settings that may differ on --resume (to extend a run); everything else in the config must match.
RESUMABLE_CHANGES = ("epochs1", "epochs2", "patience")

Log = Callable[[str], None]


# --- Keras parts, defined on first use --------------------------------------------------


@functools.cache
def _keras_parts() -> Any:
    """The Keras subclasses, created (and InferenceMode registered for loading) on first use."""
    import keras

    @keras.saving.register_keras_serializable(package="tlfeat")
    class InferenceMode(keras.layers.Layer):
        """Runs the wrapped model with training=False always (see the module docstring on BatchNorm).

        `call` has no `training` argument on purpose: a functional model passes
        its own training flag to every layer that accepts one.
        """

        def __init__(self, base: Any, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.base = base

        def call(self, inputs: Any) -> Any:
            return self.base(inputs, training=False)

        def compute_output_shape(self, input_shape: Any) -> Any:
            return self.base.compute_output_shape(input_shape)

        def get_config(self) -> dict:
            return {**super().get_config(), "base": keras.saving.serialize_keras_object(self.base)}

        @classmethod
        def from_config(cls, config: dict) -> "InferenceMode":
            config = dict(config)
            config["base"] = keras.saving.deserialize_keras_object(config["base"])
            return cls(**config)

    class ImageBatches(keras.utils.PyDataset):
        """(images, labels, weights) batches of one split, decoded by worker threads.

        The order of an epoch, and every augmentation, are functions of (seed,
        epoch, image), so a resumed run sees the same batches as an uninterrupted
        one whatever the thread timing. A file that cannot be decoded gets a
        zero image with sample weight 0: batch shapes stay fixed and the file
        counts neither in the loss nor in the (weighted) accuracy.
        """

        def __init__(
            self,
            files: Sequence[Path],
            labels: np.ndarray,
            size: int,
            preprocess: Callable[[np.ndarray], np.ndarray],
            batch_size: int,
            seed: int,
            shuffle: bool,
            augment: bool,
            on_failure: Callable[[Path, str], None],
        ) -> None:
            super().__init__(workers=default_workers(), use_multiprocessing=False)
            self.files = list(files)
            self.labels = np.asarray(labels, dtype=np.int32)
            self.size = size
            self.preprocess = preprocess
            self.batch_size = batch_size
            self.seed = seed
            self.shuffle = shuffle
            self.augment = augment
            self.on_failure = on_failure
            self.set_epoch(0)

        def set_epoch(self, epoch: int) -> None:
            self.epoch = epoch
            n = len(self.files)
            self.order = np.random.default_rng((self.seed, epoch)).permutation(n) if self.shuffle else np.arange(n)

        def __len__(self) -> int:
            return math.ceil(len(self.files) / self.batch_size)

        def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
            images = np.zeros((len(rows), self.size, self.size, 3), dtype=np.float32)
            weights = np.ones(len(rows), dtype=np.float32)
            for slot, row in enumerate(rows):
                try:
                    pixels = decode_image(self.files[row], self.size)
                except DecodeError as exc:
                    weights[slot] = 0.0
                    self.on_failure(self.files[row], str(exc))
                    continue
                if self.augment:
                    pixels = augment_image(pixels, np.random.default_rng((self.seed, self.epoch, int(row))))
                images[slot] = pixels
            return self.preprocess(images), self.labels[rows], weights

    class RunRecorder(keras.callbacks.Callback):
        """After every epoch: history, best checkpoint, early stopping, last checkpoint and state.

        Keras' ModelCheckpoint, EarlyStopping and CSVLogger each keep their own
        state in memory and start afresh on every fit call; this one callback
        keeps it all in state.json so a resumed run carries on exactly.
        """

        def __init__(self, run: "_Run", stage: int, dataset: Any) -> None:
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

    return InferenceMode, ImageBatches, RunRecorder


def augment_image(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Training-only augmentation of a (size, size, 3) uint8 image: random crop-and-zoom, then a random flip."""
    from PIL import Image

    size = pixels.shape[0]
    side = max(1, int(round(size * rng.uniform(*CROP_SCALE))))
    x0, y0 = rng.integers(0, size - side + 1, size=2)
    cropped = Image.fromarray(pixels).resize((size, size), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    out = np.asarray(cropped, dtype=np.uint8)
    return out[:, ::-1] if rng.random() < 0.5 else out


# --- run description ------------------------------------------------------------------------


@dataclass
class FinetuneSummary:
    out: Path
    summary: dict  # what summary.json holds
    resumed_from: tuple[int, int] | None = None  # (stage, epochs done in it) when --resume continued a run
    already_finished: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


def dataset_fingerprint(scan: DatasetScan) -> str:
    """Which images, classes and splits a run trains on (file contents are not hashed)."""
    digest = hashlib.sha256()
    for e in scan.entries:
        digest.update(f"{e.split}\t{e.class_name}\t{e.relpath}\n".encode())
    return digest.hexdigest()


def _find_resumable(prefix: str) -> Path:
    """The newest unfinished run named runs/<prefix>*."""
    candidates = [
        p for p in sorted(RUNS_DIR.glob(prefix + "*"))
        if (p / STATE_NAME).is_file() and not read_json_object(p / STATE_NAME).get("finished")
    ]
    if not candidates:
        raise TlfeatError(f"--resume: no unfinished run {RUNS_DIR / prefix}* to continue; pass --out RUN_DIR")
    return candidates[-1]


def _param_count(weights: Sequence[Any]) -> int:
    return int(sum(math.prod(w.shape) for w in weights))


def _check_trainable_split(scan: DatasetScan) -> None:
    counts = scan.split_counts()
    if "val" not in counts:
        raise TlfeatError(
            f"{scan.root}: no val images; fine-tuning keeps the best epoch by val accuracy "
            "(give --split a val share or add a val/ folder)"
        )
    in_train = {e.class_name for e in scan.entries if e.split == "train"}
    missing = [c for c in scan.class_names if c not in in_train]
    if missing:
        raise TlfeatError(f"{scan.root}: class(es) {', '.join(missing)} have no images in the train split")


# --- the run --------------------------------------------------------------------------------


class _Run:
    """One run folder: its config, state (history, best epoch, per-stage progress) and files."""

    def __init__(self, out: Path, config: dict, state: dict, log: Log) -> None:
        self.out = out
        self.config = config
        self.state = state
        self.log = log
        self.failures: dict[str, str] = dict(state.get("skipped", {}))
        self._failure_lock = threading.Lock()

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    def last_checkpoint(self) -> Path | None:
        name = self.state.get("last_checkpoint")
        return self.checkpoints / name if name else None

    def remove_stale_checkpoints(self) -> None:
        """Delete checkpoint files the state no longer names (older epochs, or left by a kill)."""
        keep = {self.state.get("last_checkpoint"), (self.state.get("best") or {}).get("file")}
        for path in self.checkpoints.glob("*.keras"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def global_epochs(self) -> int:
        return len(self.state["history"])

    def stage_state(self, stage: int) -> dict:
        return self.state["stages"][str(stage)]

    def note_failure(self, path: Path, reason: str) -> None:
        relpath = Path(path).relative_to(self.config["dataset_root"]).as_posix()
        with self._failure_lock:
            if relpath in self.failures:
                return
            self.failures[relpath] = reason
        self.log(f"  skipped {relpath}: {reason}")

    def save_state(self) -> None:
        with self._failure_lock:  # decoding threads may be adding failures right now
            self.state["skipped"] = dict(self.failures)
        write_json(self.out / STATE_NAME, {"config": self.config, **self.state})

    def record_epoch(self, model: Any, stage: int, epoch: int, logs: dict, seconds: float) -> bool:
        """Record one finished epoch, save checkpoints and state; True when early stopping says stop."""
        stage_state = self.stage_state(stage)
        entry = {
            "global_epoch": self.global_epochs() + 1,
            "stage": stage,
            "epoch": epoch,
            **{k: float(logs[k]) for k in ("loss", "accuracy", "val_loss", "val_accuracy")},
            "learning_rate": stage_state["learning_rate"],
            "seconds": seconds,
        }
        self.state["history"].append(entry)
        stage_state["epochs_run"] = epoch
        stage_state["seconds"] += seconds
        self.state["seconds"] += seconds

        notes = []
        best = self.state.get("best")
        # On a small val split accuracy ties are common; the lower val loss breaks them.
        is_best = best is None or (entry["val_accuracy"], -entry["val_loss"]) > (
            best["val_accuracy"], -best["val_loss"]
        )
        if is_best:
            best_name = f"best-e{entry['global_epoch']:04d}.keras"
            _save_model_atomically(model, self.checkpoints / best_name)
            self.state["best"] = {k: entry[k] for k in ("global_epoch", "stage", "epoch", "val_accuracy", "val_loss")}
            self.state["best"]["file"] = best_name
            notes.append("best so far")

        # Early stopping watches val loss, which keeps moving after accuracy saturates on a small val set.
        stop = False
        patience = self.config["patience"]
        if stage_state["best_val_loss"] is None or entry["val_loss"] < stage_state["best_val_loss"]:
            stage_state["best_val_loss"], stage_state["wait"] = entry["val_loss"], 0
        else:
            stage_state["wait"] += 1
            if patience and stage_state["wait"] >= patience:
                stage_state["stopped_early"] = stop = True
                notes.append(f"no val loss improvement for {patience} epochs, stopping stage {stage}")

        # Checkpoints get fresh names, and the state points at them only once they are complete,
        # so a kill at any moment leaves a state naming whole checkpoints of the epochs it records.
        if is_best:
            last_name = best_name  # the same model and optimizer state: one file serves both
        else:
            last_name = f"last-e{entry['global_epoch']:04d}.keras"
            _save_model_atomically(model, self.checkpoints / last_name)
        self.state["last_checkpoint"] = last_name
        self.write_history()
        self.save_state()
        self.remove_stale_checkpoints()

        planned = self.config[f"epochs{stage}"]
        self.log(
            f"stage {stage} epoch {epoch}/{planned}: loss {entry['loss']:.4f} acc {entry['accuracy']:.3f}  "
            f"val loss {entry['val_loss']:.4f} val acc {entry['val_accuracy']:.3f}  {seconds:.1f} s"
            + (f"  ({'; '.join(notes)})" if notes else "")
        )
        return stop

    def write_history(self) -> None:
        history = self.state["history"]
        write_json(self.out / "history.json", {"stage2_starts_at": self.stage2_start(), "epochs": history})
        write_csv(self.out / "history.csv", HISTORY_FIELDS, [[e[k] for k in HISTORY_FIELDS] for e in history])

    def stage2_start(self) -> int | None:
        return next((e["global_epoch"] for e in self.state["history"] if e["stage"] == 2), None)


def _save_model_atomically(model: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")  # Keras insists on the .keras suffix
    try:
        model.save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _new_state() -> dict:
    stage = {
        "epochs_run": 0, "stopped_early": False, "seconds": 0.0, "trainable_params": None,
        "non_trainable_params": None, "learning_rate": None, "best_val_loss": None, "wait": 0,
    }
    return {
        "format": RUN_FORMAT + "-state", "history": [], "best": None, "seconds": 0.0, "finished": False,
        "last_checkpoint": None, "stages": {"1": dict(stage), "2": dict(stage)}, "skipped": {},
    }


def _open_run(out: Path | None, resume: bool, config: dict, scan: DatasetScan, log: Log) -> _Run:
    """The run to write: a new, empty folder, or with `resume` an unfinished run of the same settings."""
    if out is None:
        k = config["unfreeze_top"]
        prefix = f"{scan.name}-{config['backbone']}-{'all' if k == 'all' else f'top{k}'}-"
        out = _find_resumable(prefix) if resume else RUNS_DIR / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TlfeatError(f"{out}: exists and is not a folder; --out needs a run folder")
    if not resume:
        if out.exists() and any(out.iterdir()):
            what = "holds a fine-tune run" if (out / STATE_NAME).exists() else "is not empty"
            raise TlfeatError(f"{out}: {what}; pass --resume to continue it, or choose another --out")
        return _Run(out, config, _new_state(), log)

    if not (out / STATE_NAME).is_file():
        raise TlfeatError(f"{out}: not a fine-tune run to resume (no {STATE_NAME})")
    saved = read_json_object(out / STATE_NAME)
    if saved.get("format") != RUN_FORMAT + "-state" or not isinstance(saved.get("config"), dict):
        raise TlfeatError(f"{out / STATE_NAME}: not a tlfeat fine-tune state file")
    old = saved.pop("config")
    # The dataset may have moved: its fingerprint (images, classes, splits) is what must match.
    differs = [
        f"{k} {_short(config[k])} vs {_short(old.get(k))}"
        for k in config
        if k not in RESUMABLE_CHANGES and k != "dataset_root" and config[k] != old.get(k)
    ]
    if differs:
        raise TlfeatError(
            f"{out}: was started with other settings ({'; '.join(differs)} [now vs run]); "
            "resume with the original options or start a new --out"
        )
    return _Run(out, config, saved, log)


def _short(value: Any, limit: int = 24) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _head_model(base: Any, n_classes: int, image_size: int, name: str) -> Any:
    import keras

    inference_mode, _, _ = _keras_parts()
    inputs = keras.Input((image_size, image_size, 3), name="image")
    features = inference_mode(base, name="base")(inputs)
    # The study's head, kept as published: no activation on the hidden layer.
    hidden = keras.layers.Dense(HIDDEN_UNITS, name="head_dense")(features)
    hidden = keras.layers.Dropout(DROPOUT, name="head_dropout")(hidden)
    # float32 softmax even under mixed precision: bfloat16 probabilities are too coarse for the loss.
    outputs = keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="predictions")(hidden)
    return keras.Model(inputs, outputs, name=f"{name}_finetune")


def base_of(model: Any) -> Any:
    """The backbone inside a fine-tune model."""
    return model.get_layer("base").base


def set_unfrozen_top(model: Any, k: int) -> None:
    """Make exactly the last k layers of the base trainable (k=0 freezes it); the head stays trainable."""
    base = base_of(model)
    base.trainable = k > 0  # a model set non-trainable hides every sublayer's weights, whatever their flags
    first = len(base.layers) - k
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= first


def _compile(model: Any, learning_rate: float, jit_compile: Any) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        # Weighted, so images that failed to decode (sample weight 0) do not count.
        weighted_metrics=["accuracy"],
        jit_compile=jit_compile,
    )


def _jit_compile(on_gpu: bool) -> Any:
    import keras

    if on_gpu:
        return "auto"
    # On a CPU, TensorFlow's XLA compile (per stage and batch shape) bought nothing measurable in short
    # runs; JAX without jit dispatches op by op, far slower than compiling.
    return "auto" if keras.backend.backend() == "jax" else False


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
        raise TlfeatError(f"--image-size {size}: must be at least 32 pixels")
    scan = scan_dataset(data, seed=seed, ratios=ratios)
    _check_trainable_split(scan)
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
    run = _open_run(out, resume, config, scan, log)
    if run.state.get("finished"):
        summary = read_run_summary(run.out)
        return FinetuneSummary(run.out, summary, already_finished=True, skipped=sorted(run.failures.items()))

    on_gpu = accelerator_present()
    model, resumed_from = _load_or_build(run, spec, weights, on_gpu)
    n_layers = len(base_of(model).layers)
    k = n_layers if requested == "all" else requested
    if k > n_layers:
        raise TlfeatError(
            f"--unfreeze-top {k}: {spec.name} has only {n_layers} layers; use --unfreeze-all to train them all"
        )
    config["base_layers"] = n_layers

    with OutputLock(run.out / "run"):
        run.save_state()
        jit_compile = _jit_compile(on_gpu)
        try:
            _train(run, model, scan, spec, k, jit_compile, progress)
        except KeyboardInterrupt:
            raise TlfeatError(
                f"interrupted; {run.global_epochs()} finished epochs are saved in {run.out}: "
                f"rerun with --resume --out {run.out} and the same options to continue"
            ) from None
        summary = _finish(run, scan, spec, on_gpu, jit_compile)
    return FinetuneSummary(run.out, summary, resumed_from, skipped=sorted(run.failures.items()))


def _requested_unfreeze(spec: Backbone, unfreeze_top: int | None, unfreeze_all: bool) -> int | str:
    """How many base layers stage 2 trains: a count, or "all"."""
    if unfreeze_all:
        if unfreeze_top is not None:
            raise TlfeatError("--unfreeze-top and --unfreeze-all exclude each other; give one")
        return "all"
    if unfreeze_top is None:
        if spec.name not in DEFAULT_UNFREEZE_TOP:
            raise TlfeatError(
                f"{spec.name}: no default layer count to unfreeze; give --unfreeze-top K or --unfreeze-all"
            )
        return DEFAULT_UNFREEZE_TOP[spec.name]
    if unfreeze_top < 0:
        raise TlfeatError(f"--unfreeze-top {unfreeze_top}: must be 0 or more")
    return unfreeze_top


def _check_options(
    epochs1: int, epochs2: int, requested: int | str, batch_size: int, lr1: float, lr2: float, patience: int
) -> None:
    if epochs1 < 0 or epochs2 < 0:
        raise TlfeatError(f"--epochs1 {epochs1} --epochs2 {epochs2}: epoch counts cannot be negative")
    if epochs1 + (epochs2 if requested != 0 else 0) == 0:
        raise TlfeatError("nothing to train: --epochs1 is 0 and stage 2 has no epochs or no unfrozen layers")
    if batch_size < 1:
        raise TlfeatError(f"--batch-size {batch_size}: must be at least 1")
    if not (lr1 > 0 and lr2 > 0):
        raise TlfeatError(f"--lr1 {lr1} --lr2 {lr2}: learning rates must be positive")
    if patience < 0:
        raise TlfeatError(f"--patience {patience}: must be 0 (off) or more")


def _load_or_build(run: _Run, spec: Backbone, weights: str, on_gpu: bool) -> tuple[Any, tuple[int, int] | None]:
    """The model to train: the run's last checkpoint, or a new one. Also (stage, epoch) resumed after."""
    import keras

    checkpoint = run.last_checkpoint()
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise TlfeatError(f"{run.out}: its state names {checkpoint.name}, which is missing; cannot resume")
        _keras_parts()  # registers InferenceMode for loading
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
        return _head_model(base, len(config["classes"]), config["image_size"], spec.name), None
    finally:
        keras.config.set_dtype_policy(previous)


def _train(
    run: _Run, model: Any, scan: DatasetScan, spec: Backbone, k: int, jit_compile: Any, progress: bool
) -> None:
    """Run what is left of stage 1 (head only) and stage 2 (top k base layers too)."""
    import keras

    config = run.config
    _, image_batches, recorder = _keras_parts()

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
            _compile(model, lr, jit_compile)
            stage_state.update(
                trainable_params=_param_count(model.trainable_weights),
                non_trainable_params=_param_count(model.non_trainable_weights),
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


def _restore_best_of_stage_1(run: _Run, model: Any) -> None:
    """Start stage 2 from stage 1's best epoch: later stage-1 epochs only overfit the head (early stopping lets
    them run `patience` epochs past the best), and fine-tuning the base on top of that starts from a worse point."""
    import keras

    best = run.state.get("best")
    last = run.state["history"][-1] if run.state["history"] else None
    if not best or best["stage"] != 1 or last is None or last["global_epoch"] == best["global_epoch"]:
        return
    _keras_parts()  # registers InferenceMode for loading
    best_model = keras.saving.load_model(run.checkpoints / best["file"], compile=False)
    model.set_weights(best_model.get_weights())
    run.log(
        f"stage 2 starts from stage 1's best epoch {best['epoch']} (val acc {best['val_accuracy']:.3f}, "
        f"val loss {best['val_loss']:.4f}), not its last ({last['epoch']})"
    )


def _finish(run: _Run, scan: DatasetScan, spec: Backbone, on_gpu: bool, jit_compile: Any) -> dict:
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
    for split in SPLIT_DIRS:
        entries = [e for e in scan.entries if e.split == split]
        if not entries:
            continue
        files = [scan.root / e.relpath for e in entries]
        proba, ok, failures = predict_arrays(model, files, config["image_size"], spec.preprocess, config["batch_size"])
        for path, reason in failures:
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


# --- reports ---------------------------------------------------------------------------------


def save_png(fig: Any, path: Path, dpi: int = 100) -> None:
    """Render a matplotlib Figure to PNG, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())


def plot_history(history: Sequence[dict], stage2_start: int | None, path: Path, title: str) -> None:
    """Training and validation accuracy and loss over all epochs, a dashed line where stage 2 starts."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [e["global_epoch"] for e in history]
    fig = Figure(figsize=(10, 4))
    for i, (metric, label) in enumerate((("accuracy", "accuracy"), ("loss", "loss"))):
        ax = fig.add_subplot(1, 2, i + 1)
        ax.plot(epochs, [e[metric] for e in history], marker=".", label=f"train {label}")
        ax.plot(epochs, [e[f"val_{metric}"] for e in history], marker=".", label=f"val {label}")
        if stage2_start is not None:
            ax.axvline(stage2_start - 0.5, color="grey", linestyle="--", label="stage 2 starts")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path)


# --- loading and prediction ------------------------------------------------------------------


def _run_files(path: Path) -> tuple[Path, Path]:
    """(model.keras, summary.json) for a run folder, its model.keras or its summary.json."""
    path = Path(path)
    if path.is_dir():
        return path / MODEL_NAME, path / SUMMARY_NAME
    if path.suffix == ".keras":
        return path, path.parent / SUMMARY_NAME
    if path.name == SUMMARY_NAME:
        return path.parent / MODEL_NAME, path
    raise TlfeatError(f"{path}: not a fine-tune run (give its folder, {MODEL_NAME} or {SUMMARY_NAME})")


def read_run_summary(path: Path) -> dict:
    """summary.json of a finished fine-tune run, checked to be one."""
    _, summary_path = _run_files(path)
    if not summary_path.is_file():
        raise TlfeatError(f"{path}: no {SUMMARY_NAME}; not a finished fine-tune run")
    summary = read_json_object(summary_path)
    check_format(summary_path, summary, RUN_FORMAT, RUN_FORMAT_VERSION, "a tlfeat fine-tune summary", "rerun it")
    return summary


def load_finetuned(path: Path, summary_required: bool = True) -> tuple[Any, dict]:
    """(Keras model, summary dict) of a fine-tune run: its folder, model.keras or summary.json.

    `summary_required=False` loads a run's model before summary.json exists (the run itself scoring it).
    """
    import keras

    model_path, _ = _run_files(path)
    summary = read_run_summary(path) if summary_required else {}
    if not model_path.is_file():
        raise TlfeatError(f"{model_path}: model file not found")
    if summary:
        spec = get_backbone(summary["backbone"])
        if spec.preprocessing != summary["preprocessing"]:
            raise TlfeatError(
                f"{model_path}: trained with preprocessing {summary['preprocessing']!r}, "
                f"this tlfeat's {spec.name} uses {spec.preprocessing!r}"
            )
    _keras_parts()  # registers InferenceMode for loading
    try:
        model = keras.saving.load_model(model_path, compile=False)
    except Exception as exc:  # any failure to read the file is the file's problem
        raise TlfeatError(f"{model_path}: cannot load ({describe_exception(exc)})") from None
    return model, summary


def predict_arrays(
    model: Any, files: Sequence[str | Path], image_size: int, preprocess: Callable[[np.ndarray], np.ndarray],
    batch_size: int = 32,
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Class probabilities of the decodable files: (probabilities (n_ok, C), their indices, failures).

    Failures are (path, reason) for files that cannot be decoded.
    """
    chunks, ok, failures = [], [], []
    n_classes = int(model.output.shape[-1])
    for batch in iter_batches(list(files), image_size, preprocess, batch_size):
        if len(batch.images):
            chunks.append(np.asarray(model.predict_on_batch(batch.images), dtype=np.float32))
        ok.extend(batch.start + i for i in batch.ok)
        failures.extend((str(files[batch.start + i]), reason) for i, reason in batch.failures)
    proba = np.concatenate(chunks) if chunks else np.zeros((0, n_classes), dtype=np.float32)
    return proba, ok, failures


def predict_files(
    run_or_model_path: Path, files: Sequence[str | Path], batch_size: int = 32
) -> tuple[np.ndarray, list[int], list[tuple[str, str]], list[str]]:
    """Classify image files with a fine-tuned run: (probabilities (n_ok, C), ok indices, failures, class names)."""
    model, summary = load_finetuned(run_or_model_path)
    spec = get_backbone(summary["backbone"])
    proba, ok, failures = predict_arrays(model, files, int(summary["image_size"]), spec.preprocess, batch_size)
    return proba, ok, failures, list(summary["classes"])
