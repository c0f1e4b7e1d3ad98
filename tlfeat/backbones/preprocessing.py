"""Input scalings of the registered backbones, as data: a mode name, what caches record, a numpy function.

Each function maps float32 RGB in 0..255, shape (N, H, W, 3), to what the model
expects, returns a new array (the input is never modified) and needs no Keras
import, so decoding workers and other runtimes can apply or reimplement it by
mode name. "included" is for models that scale their input inside the graph
(keras.applications EfficientNet, EfficientNetV2, MobileNetV3, ConvNeXt): the
function passes pixels through, so the scaling is never applied twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

# The ImageNet statistics keras.applications.imagenet_utils uses, per RGB channel.
_CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], dtype=np.float32)
_TORCH_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_TORCH_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


@dataclass(frozen=True)
class Preprocessing:
    """One input scaling: `mode` names it, `key` is what feature caches record, `apply` computes it."""

    mode: str
    key: str
    apply: Callable[[np.ndarray], np.ndarray]
    description: str


def _float32(images: np.ndarray) -> np.ndarray:
    return np.array(images, dtype=np.float32, copy=True)


def caffe(images: np.ndarray) -> np.ndarray:
    """keras.applications caffe mode: RGB->BGR, minus the ImageNet mean per channel (no scaling)."""
    bgr = _float32(images)[..., ::-1]
    return bgr - _CAFFE_MEAN_BGR


def torch(images: np.ndarray) -> np.ndarray:
    """keras.applications torch mode: /255, minus the ImageNet mean, over its std, per RGB channel."""
    # Divide, subtract, divide in float32 in Keras' order, so results are bit-identical to it.
    return (_float32(images) / np.float32(255.0) - _TORCH_MEAN) / _TORCH_STD


def tf(images: np.ndarray) -> np.ndarray:
    """keras.applications tf mode: /127.5 - 1, to -1..1."""
    return _float32(images) / np.float32(127.5) - np.float32(1.0)


def lite(images: np.ndarray) -> np.ndarray:
    """(x - 127) / 128, the scaling the EfficientNet-Lite weights were trained with."""
    return (_float32(images) - np.float32(127.0)) / np.float32(128.0)


def included(images: np.ndarray) -> np.ndarray:
    """Pixels as they are (float32 0..255): the model's first layers scale them."""
    return _float32(images)


# Test-time augmentation at extraction: "flip" averages the features of each image and its left-right
# mirror. NO_TTA is also what caches and heads from before it existed had, recording nothing.
NO_TTA = "none"
TTA_MODES = (NO_TTA, "flip")

PREPROCESSING: dict[str, Preprocessing] = {
    p.mode: p
    for p in (
        # caffe's key predates this table; changing it would orphan every resnet101/vgg16 cache.
        Preprocessing("caffe", "caffe:BGR-mean", caffe, "RGB->BGR, minus ImageNet mean"),
        Preprocessing("torch", "torch:/255-mean/std", torch, "/255, minus ImageNet mean, over std"),
        Preprocessing("tf", "tf:/127.5-1", tf, "/127.5 - 1"),
        Preprocessing("lite", "lite:(x-127)/128", lite, "(x - 127) / 128"),
        Preprocessing("included", "included:in-model", included, "0..255 in; the model scales"),
    )
}
