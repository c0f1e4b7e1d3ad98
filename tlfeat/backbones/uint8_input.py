"""A backbone's input scaling inside the model: 8-bit pixels in, scaled on the device.

The host then ships uint8 (a quarter of float32's bytes) and does no per-pixel
arithmetic; the scaling runs in the compiled graph beside the first
convolution. Each mode of tlfeat.backbones.preprocessing has its formula here in
`keras.ops`, computed in float32 whatever the model's dtype policy, in the
same operation order as the mode's numpy function, so features match feeding
the model the numpy-preprocessed float32 batch (tests/test_uint8_input.py).
"""

from __future__ import annotations

import functools
from typing import Any

# The ImageNet statistics keras.applications.imagenet_utils uses.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)


def scale(x: Any, mode: str) -> Any:
    """float32 pixels in 0..255 (any backend tensor) -> the model input of `mode`."""
    from keras import ops

    if mode == "caffe":  # RGB -> BGR, minus the mean
        return ops.flip(x, axis=-1) - ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype="float32")
    if mode == "torch":  # /255, minus the mean, over the std
        mean = ops.convert_to_tensor(TORCH_MEAN_RGB, dtype="float32")
        return (x / 255.0 - mean) / ops.convert_to_tensor(TORCH_STD_RGB, dtype="float32")
    if mode == "tf":
        return x / 127.5 - 1.0
    if mode == "lite":
        return (x - 127.0) / 128.0
    if mode == "included":  # the model scales its input itself
        return x
    raise ValueError(f"no in-graph scaling for preprocessing mode {mode!r}")


@functools.cache
def scaling_layer() -> Any:
    """The layer class (created on first use, so importing this module needs no Keras)."""
    import keras

    class InputScaling(keras.layers.Layer):
        """uint8 (or any number type) pixels -> float32 -> the backbone's scaling; always float32."""

        def __init__(self, mode: str, **kwargs: Any) -> None:
            super().__init__(dtype="float32", **kwargs)  # never the bfloat16 of a mixed policy
            self.mode = mode

        def call(self, inputs: Any) -> Any:
            return scale(keras.ops.cast(inputs, "float32"), self.mode)

        def compute_output_shape(self, input_shape: Any) -> Any:
            return input_shape

        def get_config(self) -> dict:
            config = super().get_config()
            config.pop("dtype", None)
            return {**config, "mode": self.mode}

    return InputScaling


def with_uint8_input(model: Any, mode: str, image_size: int) -> Any:
    """`model` (which takes input preprocessed in `mode`) behind a uint8 input and its scaling layer."""
    import keras

    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="pixels")
    scaled = scaling_layer()(mode, name="input_scaling")(inputs)
    return keras.Model(inputs, model(scaled), name=f"{model.name}_uint8")
