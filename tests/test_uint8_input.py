"""uint8 pixels into the model, scaled inside it: the same features as the float32 preprocessed path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tlfeat.backbones import get_backbone
from tlfeat.backbones.preprocessing import PREPROCESSING
from tlfeat.backbones.registry import REGISTRY
from tlfeat.backbones.uint8_input import scale, scaling_layer
from tlfeat.data.batches import iter_batches
from tlfeat.runtime import FeatureExtractor


def _pixels(folder: Path, n: int = 6) -> np.ndarray:
    files = sorted(folder.rglob("*.jpg"))[:n]
    return np.concatenate([b.pixels.copy() for b in iter_batches(files, 224, batch_size=n, workers=2)])


@pytest.mark.parametrize("backbone, weights", [
    ("resnet101", "none"), ("vgg16", "none"), ("efficientnet_lite0", "imagenet"),  # caffe, caffe, lite
    ("densenet121", "none"), ("mobilenet_v2", "none"),  # torch, tf: one of each other keras.applications mode
])
@pytest.mark.slow
def test_uint8_in_graph_features_match_the_float32_preprocessed_path(
    scene15_subset: Path, backbone: str, weights: str
) -> None:
    spec = get_backbone(backbone)
    pixels = _pixels(scene15_subset)
    extractor = FeatureExtractor(spec, weights, 224, batch_size=8)  # 6 images: the padding is exercised too
    got = extractor(pixels)
    # Today's CPU path: the registry's numpy preprocessing on the host, float32 into the same backbone.
    expected = np.asarray(extractor.inner.predict_on_batch(spec.preprocess(pixels.astype(np.float32))))
    assert got.dtype == np.float32 and got.shape == (6, spec.feature_dim)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("mode", ["caffe", "torch", "tf"])
def test_scaling_modes_equal_keras_applications_preprocess_input(mode: str) -> None:
    import keras

    pixels = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)).astype(np.float32)
    expected = keras.applications.imagenet_utils.preprocess_input(pixels.copy(), mode=mode)
    got = keras.ops.convert_to_numpy(scale(keras.ops.convert_to_tensor(pixels), mode))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("mode", sorted(PREPROCESSING))
def test_every_registry_mode_scales_in_graph_as_its_numpy_function(mode: str) -> None:
    import keras

    pixels = np.arange(256, dtype=np.uint8).reshape(1, 4, 64, 1).repeat(3, axis=-1)
    pixels[..., 1] = pixels[..., 1][:, ::-1]  # channels differ, so a flip of RGB shows
    got = keras.ops.convert_to_numpy(scale(keras.ops.convert_to_tensor(pixels.astype(np.float32)), mode))
    np.testing.assert_allclose(got, PREPROCESSING[mode].apply(pixels), rtol=1e-6, atol=1e-6)


def test_every_registered_backbone_has_an_in_graph_scaling() -> None:
    import keras

    x = keras.ops.zeros((1, 2, 2, 3))
    for spec in REGISTRY.values():
        scale(x, spec.preprocessor.mode)  # raises for a mode without one
    with pytest.raises(ValueError, match="no in-graph scaling"):
        scale(x, "unknown")


def test_scaling_stays_float32_under_a_mixed_bfloat16_policy() -> None:
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        layer = scaling_layer()("caffe")
        out = layer(keras.ops.convert_to_tensor(np.full((1, 2, 2, 3), 200, dtype=np.uint8)))
    finally:
        keras.config.set_dtype_policy(previous)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out)[0, 0, 0], [96.061, 83.221, 76.32], rtol=1e-6)
