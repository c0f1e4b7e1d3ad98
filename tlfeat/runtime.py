"""Backbone runtime: device and precision policy, the feature extractor, and the one files -> batches -> model loop.

Extraction engines, `predict` and fine-tune prediction all run images through
`map_batches`/`apply_to_files`, so decoding, batching, padding and failure
handling are the same everywhere.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from tlfeat.backbones import Backbone, build_model, get_backbone
from tlfeat.backbones.preprocessing import NO_TTA, TTA_MODES
from tlfeat.data.decode import DecodedBatch, iter_batches
from tlfeat.errors import TlfeatError
from tlfeat.progress import progress_bar

CPU_BATCH_SIZE = 32
GPU_BATCH_SIZE = 256

BatchFunction = Callable[[np.ndarray], np.ndarray]  # (n, H, W, 3) preprocessed -> (n, K) float32


def accelerator_present() -> bool:
    """True when the active Keras backend sees a GPU."""
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


def default_batch_size(requested: int | None, on_gpu: bool) -> int:
    """`requested`, or the default for the device: 256 images on a GPU, 32 on a CPU."""
    return requested or (GPU_BATCH_SIZE if on_gpu else CPU_BATCH_SIZE)


def check_tta(tta: str) -> None:
    if tta not in TTA_MODES:
        raise TlfeatError(f"`tta={tta!r}`: use {' or '.join(TTA_MODES)}")


class FeatureExtractor:
    """A backbone ready for inference: fixed batch shape, bfloat16 compute on a GPU, float32 out.

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
        self.batch_size = default_batch_size(batch_size, self.on_gpu)
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(self.compute)
        try:
            self.model = build_model(backbone, weights, image_size)
        finally:
            keras.config.set_dtype_policy(previous)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) preprocessed float32 -> (n, D) float32, n <= batch_size."""
        if len(images) == 0:
            return np.zeros((0, self.backbone.feature_dim), dtype=np.float32)
        if self.tta == "flip":
            # Preprocessing is per pixel, so mirroring the model input mirrors the image.
            return (self._forward(images) + self._forward(images[:, :, ::-1])) / np.float32(2.0)
        return self._forward(images)

    def _forward(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        if n < self.batch_size:  # one input shape: the compiled function is traced once
            pad = np.zeros((self.batch_size - n, *images.shape[1:]), dtype=images.dtype)
            images = np.concatenate([images, pad])
        features = self.model.predict_on_batch(images)
        return np.asarray(features, dtype=np.float32)[:n]


_EXTRACTORS: OrderedDict[tuple, FeatureExtractor] = OrderedDict()


def get_extractor(
    backbone: Backbone, weights: str, image_size: int, batch_size: int | None, tta: str = NO_TTA
) -> FeatureExtractor:
    """Build or reuse (per process, two at most) the extractor for these settings."""
    key = (backbone.name, weights, image_size, batch_size, tta)
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = FeatureExtractor(backbone, weights, image_size, batch_size, tta)
        while len(_EXTRACTORS) > 2:
            _EXTRACTORS.popitem(last=False)
    _EXTRACTORS.move_to_end(key)
    return _EXTRACTORS[key]


def map_batches(
    files: Sequence[str | Path], image_size: int, preprocess: Callable[[np.ndarray], np.ndarray],
    batch_size: int, compute: BatchFunction, bar: Any = None,
) -> Iterator[tuple[DecodedBatch, np.ndarray]]:
    """Decode `files` in batches (canonical order) and run `compute` on each: (batch, outputs) per batch.

    `bar`, if given, advances once a batch is computed.
    """
    for batch in iter_batches(list(files), image_size, preprocess, batch_size):
        outputs = compute(batch.images)
        if bar is not None:
            bar.update(batch.length)
        yield batch, outputs


@dataclass
class BatchOutputs:
    """What `apply_to_files` computed: one output row per decodable file."""

    outputs: np.ndarray  # (len(ok), K) float32
    ok: list[int]  # indices of the input files that were decoded and computed
    failures: list[tuple[str, str]]  # (path, reason) of the files that could not be decoded


def apply_to_files(
    files: Sequence[str | Path], image_size: int, preprocess: Callable[[np.ndarray], np.ndarray],
    batch_size: int, compute: BatchFunction, n_outputs: int, progress: bool = False, desc: str = "",
) -> BatchOutputs:
    """Run `compute` over every decodable file and gather the outputs."""
    chunks, ok, failures = [], [], []
    with progress_bar(len(files), progress, desc) as bar:
        for batch, outputs in map_batches(files, image_size, preprocess, batch_size, compute, bar):
            if batch.ok:
                chunks.append(np.asarray(outputs, dtype=np.float32))
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
    extractor = get_extractor(spec, weights, size, batch_size, tta)
    return apply_to_files(
        files, size, spec.preprocess, extractor.batch_size, extractor, spec.feature_dim, progress, f"embed {spec.name}"
    )
