"""The fine-tune model: a backbone wrapped in inference mode plus the study's head; freezing and compiling.

BatchNorm: the base always runs in inference mode, unfrozen or not, so its
moving mean and variance stay the pretrained ones and only gamma/beta of
unfrozen BatchNorm layers learn. Small fine-tuning batches would otherwise
replace the ImageNet statistics with noisy ones and wreck the features. Keras 3
makes this easy to get wrong: ``base(x, training=False)`` inside a functional
model is overridden by ``fit``'s training=True (keras-team/keras#20285), so the
base is wrapped in `InferenceMode`, a layer with no `training` argument to
override. Keras is imported on first use only.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tlfeat.fileio import atomic_path
from tlfeat.heads.keras_head import rmsprop, study_head


@functools.cache
def inference_mode_layer() -> Any:
    """The InferenceMode layer class, created (and registered for loading) on first use."""
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

    return InferenceMode


def build_finetune_model(base: Any, n_classes: int, image_size: int, name: str) -> Any:
    """image -> base (always in inference mode) -> the study's head, to its logits (`with_probabilities` adds
    the softmax to the model a run saves)."""
    import keras

    inputs = keras.Input((image_size, image_size, 3), name="image")
    features = inference_mode_layer()(base, name="base")(inputs)
    return keras.Model(inputs, study_head(features, n_classes, name="head", logits=True), name=f"{name}_finetune")


def outputs_logits(model: Any) -> bool:
    """True for a model trained to its logits; False for one ending in the softmax (runs from before that)."""
    return model.layers[-1].get_config().get("activation") == "linear"


def with_probabilities(model: Any) -> Any:
    """`model` ending in the softmax, as model.keras holds it for predict and evaluate: a model trained to its
    logits gets a float32 softmax layer (no weights) on top; one that already ends in it is returned as it is."""
    import keras

    if not outputs_logits(model):
        return model
    probabilities = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(model.outputs[0])
    return keras.Model(model.input, probabilities, name=model.name)


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


def top_with_weights(model: Any) -> int:
    """The fewest top layers of the base that include one with weights (the last layers of a backbone, its
    pooling and activations, often have none)."""
    layers = base_of(model).layers
    return next((len(layers) - i for i in range(len(layers) - 1, -1, -1) if layers[i].weights), len(layers))


def compile_model(model: Any, learning_rate: float, jit_compile: Any) -> None:
    import keras

    model.compile(
        optimizer=rmsprop(learning_rate),  # keeps no train graph behind once the run is over
        # From the logits: on softmax outputs only TensorFlow's Keras recovers them; JAX's and torch's clip the
        # probabilities at 1e-7, so an image scored below that for its class gave no gradient at all.
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=outputs_logits(model)),
        # Weighted, so images that failed to decode (sample weight 0) do not count.
        weighted_metrics=["accuracy"],
        jit_compile=jit_compile,
    )


def jit_compile_setting(on_gpu: bool) -> Any:
    import keras

    if on_gpu:
        return "auto"
    # On a CPU, TensorFlow's XLA compile (per stage and batch shape) bought nothing measurable in short
    # runs; JAX without jit dispatches op by op, far slower than compiling.
    return "auto" if keras.backend.backend() == "jax" else False


def param_count(weights: Sequence[Any]) -> int:
    """How many numbers a list of weights holds."""
    return int(sum(math.prod(w.shape) for w in weights))


def save_model_atomically(model: Any, path: Path) -> None:
    """Save a Keras model (and its optimizer) so that a kill leaves the old file or the new one."""
    with atomic_path(path) as tmp:
        model.save(tmp)


def reseed(model: Any, seed: int, epoch: int) -> None:
    """Start epoch `epoch`'s random draws from (seed, epoch): dropout masks and anything seeded globally.

    Keras saves no seed generator state in a checkpoint: a resumed model would draw other dropout masks
    than the uninterrupted one did. Setting every generator of the model at each epoch's start makes the
    draws a function of the epoch alone, so both runs draw the same.
    """
    import keras

    keras.utils.set_random_seed(int(np.random.SeedSequence((seed, epoch)).generate_state(1)[0]))
    states = [v for v in model.variables if v.name == "seed_generator_state"]
    for index, state in enumerate(states):
        start = int(np.random.SeedSequence((seed, epoch, index + 1)).generate_state(1)[0])
        # The state is uint32 under JAX and TensorFlow but int32 under torch: a start past 2**31 overflowed there.
        start %= int(np.iinfo(np.dtype(state.dtype)).max) + 1
        state.assign(np.array([start, 0], dtype=state.dtype))
