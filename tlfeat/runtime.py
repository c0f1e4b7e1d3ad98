"""Backbone runtime: device and precision policy, the feature extractor, and the one files -> batches -> model loop.

Extraction engines, `predict` and fine-tune prediction all run images through
`map_batches`/`apply_to_files` into a `CompiledModel`, so decoding, batching,
padding, failure handling and the model path are the same everywhere: uint8
pixels go to the device, the backbone's input scaling runs inside the compiled
model, and the host fetches a batch's outputs only after dispatching the next.
"""

from __future__ import annotations

import glob
import math
import sys
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from tlfeat.backbones import Backbone, build_model, get_backbone
from tlfeat.backbones.registry import weights_file
from tlfeat.backbones.uint8_input import with_uint8_input
from tlfeat.data.batches import DecodedBatch, DecodePool, bytes_in_flight, iter_batches, shared_pool
from tlfeat.data.cores import available_memory
from tlfeat.backbones.preprocessing import NO_TTA, TTA_MODES
from tlfeat.errors import TlfeatError, integer
from tlfeat.progress import progress_bar

CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 256

BatchFunction = Callable[[np.ndarray], "Pending"]  # (n, H, W, 3) uint8 -> its (n, K) outputs, maybe computing


# On Linux a GPU any Keras backend can use leaves one of these behind: NVIDIA's device nodes or kernel module (the
# nodes may be made on first use, the module is there before), AMD's (ROCm), or WSL's GPU bridge.
GPU_DRIVER_MARKERS = ("/dev/nvidia*", "/proc/driver/nvidia", "/sys/module/nvidia", "/dev/kfd", "/sys/module/amdgpu",
                      "/dev/dxg")


def no_gpu_driver() -> bool:
    """True on Linux when no GPU driver is there at all: then no backend can see a GPU, and saying so needs no
    framework import (TensorFlow's takes seconds, most of an up-to-date extract's time)."""
    return sys.platform.startswith("linux") and not any(glob.glob(marker) for marker in GPU_DRIVER_MARKERS)


def accelerator_present() -> bool:
    """True when the active Keras backend sees a GPU."""
    if no_gpu_driver():
        return False
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
        if backend == "torch":
            import torch

            return bool(torch.cuda.is_available())
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
    except Exception:  # a broken accelerator runtime means: compute on the CPU
        return False
    return False


def compute_policy(on_gpu: bool) -> str:
    """The precision a backbone computes in, part of the cache key: mixed_bfloat16 on a GPU, float32 on a CPU."""
    return "mixed_bfloat16" if on_gpu else "float32"


def check_batch_size(batch_size: int | None) -> int | None:
    """None (the device's default, `default_batch_size`) or an integer of at least 1, as a Python int."""
    return None if batch_size is None else integer("batch_size", batch_size, 1)


def default_batch_size(requested: int | None, on_gpu: bool) -> int:
    """`requested`, or the default for the device: 256 images on a GPU, 32 on a CPU."""
    return requested or (GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE)


def check_tta(tta: str) -> None:
    if tta not in TTA_MODES:
        raise TlfeatError(f"`tta={tta!r}`: use {' or '.join(TTA_MODES)}")


@dataclass
class Pending:
    """A batch's outputs, possibly still being computed on the device: `result()` waits and brings them over."""

    outputs: Any  # a backend tensor, (batch_size, K)
    n: int  # rows that are real images; the rest padded the batch

    def result(self) -> np.ndarray:
        import keras

        return np.asarray(keras.ops.convert_to_numpy(self.outputs)[: self.n], dtype=np.float32)


def compiled_forward(model: Any) -> Callable[[np.ndarray], Any]:
    """`model` in inference, compiled for the active backend, returning without waiting for the device.

    JAX: one jitted function (XLA) of the weights and the batch; TensorFlow: a tf.function;
    torch: the module without autograd (CUDA runs asynchronously by itself).
    """
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        jitted = jax.jit(lambda t, nt, x: model.stateless_call(t, nt, x, training=False)[0])
        return lambda pixels: jitted(trainable, non_trainable, pixels)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(lambda pixels: model(pixels, training=False))
    if backend == "torch":
        import torch

        def forward(pixels: np.ndarray) -> Any:
            with torch.no_grad():
                return model(pixels, training=False)

        return forward
    return lambda pixels: model(pixels, training=False)


class CompiledModel:
    """A Keras model fed uint8 pixels: its input scaling inside the compiled graph, one fixed batch shape.

    `model` takes float input scaled in preprocessing `mode` (a backbone, a fine-tuned classifier);
    this wraps it behind a uint8 input (tlfeat.backbones.uint8_input), so the host ships bytes.
    """

    def __init__(self, model: Any, mode: str, image_size: int, batch_size: int) -> None:
        self.inner = model
        self.model = with_uint8_input(model, mode, image_size)
        self.batch_size = batch_size
        self.forward = compiled_forward(self.model)

    def submit(self, pixels: np.ndarray) -> Pending:
        """(n, H, W, 3) uint8, n <= batch_size -> its (n, K) outputs, computing (see `Pending`)."""
        n = len(pixels)
        if n < self.batch_size:  # one input shape: traced once (`extract` cuts a batch larger than its dataset)
            pixels = np.concatenate([pixels, np.zeros((self.batch_size - n, *pixels.shape[1:]), dtype=np.uint8)])
        return Pending(self.forward(pixels), n)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) uint8 -> (n, K) float32, waited for."""
        return self.submit(pixels).result()


def activation_bytes(model: Any) -> int:
    """Estimated CPU memory one image takes in a forward pass of `model`: three float32 copies of its largest
    layer output (that layer's input and output, and the backend's scratch for it, e.g. im2col). Measured on
    TensorFlow at 32 px and 256 images: VGG16 grew by 190 MB (this says 192), ResNet50 by 47 (this says 61)."""
    import keras

    largest, layers = 0, list(model.layers)
    while layers:
        layer = layers.pop()
        if hasattr(layer, "layers"):  # a nested model (the backbone inside its uint8 wrapper): its own layers
            layers += layer.layers
            continue
        try:
            outputs = keras.tree.flatten(layer.output)
        except (AttributeError, ValueError):  # a layer never or repeatedly called has no single output
            continue
        largest = max([largest, *(math.prod(t.shape[1:]) for t in outputs)])
    return 3 * 4 * largest


def check_input_memory(batch_size: int, size: int) -> None:
    """A batch's decoded images in flight within half the memory available now: checked before any work,
    its activations once the model is built (`check_activation_memory`)."""
    _check_batch_memory(batch_size, size, bytes_in_flight(1, size), "holds {} of decoded images at once")


def check_activation_memory(activations: int, name: str, image_size: int, batch_size: int) -> None:
    """Refuse, in one line, a batch whose `activations` (bytes an image) and decoded images would not fit in
    half the memory available now: beyond it the backend's allocation fails in native code (a segfault)."""
    _check_batch_memory(batch_size, image_size, activations + bytes_in_flight(1, image_size),
                        f"needs about {{}} for {name}'s activations and images at once")


def _check_batch_memory(batch_size: int, image_size: int, per_image: int, needs: str) -> None:
    """Refuse a batch of `per_image` bytes an image beyond half the memory available now (`needs`: what it
    takes, with {} for the amount), naming the largest batch that fits."""
    free = available_memory()
    if free is None or batch_size * per_image <= free / 2:
        return
    fits = max(1, int(free / 2 // per_image))
    raise TlfeatError(
        f"`batch_size={batch_size}` at {image_size} px {needs.format(_amount(batch_size * per_image))}; "
        f"{_amount(free)} of memory is available: use `batch_size={fits}` or less"
    )


def _amount(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


@dataclass
class PendingMean:
    """Two batches' outputs in flight whose mean is wanted (test-time augmentation)."""

    first: Pending
    second: Pending

    def result(self) -> np.ndarray:
        return (self.first.result() + self.second.result()) / np.float32(2.0)


class FeatureExtractor(CompiledModel):
    """A backbone ready for inference: uint8 in, bfloat16 compute on a GPU, float32 features out.

    tta="flip" returns the mean of each image's features and its left-right mirror's (two passes).
    """

    def __init__(
        self, backbone: Backbone, weights: str, image_size: int, batch_size: int | None = None, tta: str = NO_TTA
    ) -> None:
        import keras

        check_tta(tta)
        self.backbone = backbone
        self.image_size = image_size
        self.tta = tta
        self.on_gpu = accelerator_present()
        self.compute = compute_policy(self.on_gpu)
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.compute)
        try:
            model = build_model(backbone, weights, image_size)
        finally:
            keras.config.set_dtype_policy(previous)
        super().__init__(model, backbone.preprocessor.mode, image_size, default_batch_size(batch_size, self.on_gpu))
        self.activation_bytes = activation_bytes(self.model)

    def check_memory(self) -> None:
        """Refuse a batch that does not fit in the memory available now (asked at each run: it changes)."""
        if not self.on_gpu:  # a GPU's activations are in its own memory, whose allocator reports running out
            check_activation_memory(self.activation_bytes, self.backbone.name, self.image_size, self.batch_size)

    def submit(self, pixels: np.ndarray) -> Pending | PendingMean:
        """As CompiledModel.submit; with tta "flip" also the mirrored batch, whose mean `result()` gives."""
        if self.tta != "flip":
            return super().submit(pixels)
        return PendingMean(super().submit(pixels), super().submit(np.ascontiguousarray(pixels[:, :, ::-1])))


_EXTRACTORS: OrderedDict[tuple, FeatureExtractor] = OrderedDict()


def get_extractor(
    backbone: Backbone, weights: str, image_size: int, batch_size: int | None, tta: str = NO_TTA,
    most: int | None = None,
) -> FeatureExtractor:
    """Build or reuse (per process, two at most) the extractor for these settings, refused if its batch does not
    fit in memory. `most`: the images it will see at most; a batch beyond them only pads, so one that does not
    fit is cut to them (only then: each batch shape is another model to build)."""
    extractor = _extractor(backbone, weights, image_size, batch_size, tta)
    try:
        extractor.check_memory()
    except TlfeatError:
        if most is None or not 0 < most < extractor.batch_size:
            raise
        extractor = _extractor(backbone, weights, image_size, most, tta)
        extractor.check_memory()
    return extractor


def _weights_key(weights: str) -> tuple:
    """`weights`, and for a file its stat: a file saved again under the same name (a notebook's next fine-tune)
    holds other weights, which a kept extractor built from the old file would embed with while the cache
    records the new file's sha256."""
    if weights in ("imagenet", "none"):
        return (weights,)
    stat = weights_file(weights).stat()
    return weights, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def _extractor(backbone: Backbone, weights: str, image_size: int, batch_size: int | None, tta: str) -> FeatureExtractor:
    key = (backbone.name, _weights_key(weights), image_size, batch_size, tta)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = FeatureExtractor(backbone, weights, image_size, batch_size, tta)
        while len(_EXTRACTORS) > 2:
            _EXTRACTORS.popitem(last=False)
    _EXTRACTORS.move_to_end(key)
    return _EXTRACTORS[key]


def map_batches(
    files: Sequence[str | Path], image_size: int, batch_size: int, compute: BatchFunction, bar: Any = None,
    pool: DecodePool | None = None,
) -> Iterator[tuple[DecodedBatch, np.ndarray]]:
    """Decode `files` in batches (canonical order), run `compute` on each: (batch, outputs of `batch.ok`).

    `compute` gets a batch's uint8 pixels and may return before the device is done: batch k+1 is
    decoded and dispatched before the outputs of batch k are brought over, so the host's work and
    the transfer overlap the device's. Decoding runs in `pool`, by default this process's shared one.
    `bar`, if given, advances once a batch is computed.
    """
    previous: tuple[DecodedBatch, Pending] | None = None
    for batch in iter_batches(files, image_size, batch_size, pool=pool or shared_pool()):
        pending = compute(batch.pixels)  # the pipeline keeps these pixels until two more batches are taken
        if previous is not None:
            yield _finished(*previous, bar)
        previous = batch, pending
    if previous is not None:
        yield _finished(*previous, bar)


def _finished(batch: DecodedBatch, pending: Pending, bar: Any) -> tuple[DecodedBatch, np.ndarray]:
    outputs = pending.result()[batch.ok]
    if bar is not None:
        bar.update(batch.length)
    return batch, outputs


@dataclass
class BatchOutputs:
    """What `apply_to_files` computed: one output row per decodable file."""

    outputs: np.ndarray  # (len(ok), K) float32
    ok: list[int]  # indices of the input files that were decoded and computed
    failures: list[tuple[str, str]]  # (path, reason) of the files that could not be decoded


def apply_to_files(
    files: Sequence[str | Path], image_size: int, batch_size: int, compute: BatchFunction, n_outputs: int,
    progress: bool = False, desc: str = "",
) -> BatchOutputs:
    """Run `compute` over every decodable file and gather the outputs."""
    chunks, ok, failures = [], [], []
    with progress_bar(len(files), progress, desc) as bar, \
            closing(map_batches(files, image_size, batch_size, compute, bar)) as batches:
        for batch, outputs in batches:
            chunks.append(outputs)
            ok.extend(batch.start + i for i in batch.ok)
            failures.extend((str(files[batch.start + i]), reason) for i, reason in batch.failures)
    outputs = np.concatenate(chunks) if chunks else np.zeros((0, n_outputs), dtype=np.float32)
    return BatchOutputs(outputs, ok, failures)


def embed_files(
    files: Sequence[str | Path],
    backbone: str,
    weights: str,
    image_size: int | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    tta: str = NO_TTA,
) -> BatchOutputs:
    """Embed loose image files (no cache), e.g. for `predict`: `outputs` are the features."""
    spec = get_backbone(backbone)
    size = image_size or spec.input_size
    extractor = get_extractor(spec, weights, size, batch_size, tta, most=len(files))
    return apply_to_files(
        files, size, extractor.batch_size, extractor.submit, spec.feature_dim, progress, f"embed {spec.name}"
    )
