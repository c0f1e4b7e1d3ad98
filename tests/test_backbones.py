"""The backbone registry: every keras.applications record against Keras itself, and the listing."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from conftest import run_cli
from tlfeat.backbones import REGISTRY, get_backbone
from tlfeat.backbones.keras_applications import KERAS_APPLICATIONS, KerasApplication
from tlfeat.backbones.preprocessing import PREPROCESSING

# Random weights at this side build every family (InceptionV3 and InceptionResNetV2 need 75 px).
SMALL_INPUT = 75
# Over 10M parameters a random build takes 2 s to minutes (and GBs) on 2 cores: the `slow` variant
# checks those, so that `pytest -m "not slow"` stays under 3 minutes.
LARGE_PARAMETERS = 10_000_000


def _images() -> list[np.ndarray]:
    """Random batches as decoding gives them (whole 0..255 values) and arbitrary float32 values in range."""
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, size=(3, 9, 7, 3)).astype(np.float32),
        rng.uniform(0, 255, size=(2, 5, 4, 3)).astype(np.float32),
    ]


@pytest.mark.parametrize("app", KERAS_APPLICATIONS, ids=lambda app: app.name)
def test_preprocessing_is_exactly_the_familys_preprocess_input(app: KerasApplication) -> None:
    keras_family = importlib.import_module(f"keras.applications.{app.family}")
    spec = get_backbone(app.name)
    for images in _images():
        before = images.copy()
        ours = spec.preprocess(images)
        theirs = keras_family.preprocess_input(images.copy())  # Keras scales a float array in place
        np.testing.assert_array_equal(images, before)  # ours never touches its input
        assert ours.dtype == np.float32 and ours.shape == images.shape
        np.testing.assert_array_equal(ours, np.asarray(theirs))


def test_every_mode_is_one_of_keras_own_or_lite() -> None:
    from keras.applications import imagenet_utils

    images = _images()[0]
    for mode in ("caffe", "torch", "tf"):
        theirs = imagenet_utils.preprocess_input(images.copy(), mode=mode)
        np.testing.assert_array_equal(PREPROCESSING[mode].apply(images), theirs)
    np.testing.assert_array_equal(PREPROCESSING["included"].apply(images), images)
    assert {app.preprocessing for app in KERAS_APPLICATIONS} <= set(PREPROCESSING)


def _built(app: KerasApplication) -> None:
    import keras

    spec = get_backbone(app.name)
    model = spec.builder(None, (SMALL_INPUT, SMALL_INPUT, 3))
    try:
        assert model.output_shape == (None, app.feature_dim)
        assert model.count_params() == app.parameters
        # Scaling inside the graph exactly when the record says "included": never twice, never missing.
        scaling = (keras.layers.Rescaling, keras.layers.Normalization)
        scales_inside = any(isinstance(layer, scaling) for layer in model.layers[:6])
        assert scales_inside == (app.preprocessing == "included"), [layer.name for layer in model.layers[:6]]
    finally:
        del model
        keras.backend.clear_session()


@pytest.mark.parametrize(
    "app", [a for a in KERAS_APPLICATIONS if a.parameters <= LARGE_PARAMETERS], ids=lambda app: app.name
)
def test_feature_dim_and_parameters_match_a_random_build(app: KerasApplication) -> None:
    _built(app)


@pytest.mark.slow
@pytest.mark.parametrize(
    "app", [a for a in KERAS_APPLICATIONS if a.parameters > LARGE_PARAMETERS], ids=lambda app: app.name
)
def test_feature_dim_and_parameters_match_a_random_build_large(app: KerasApplication) -> None:
    _built(app)


def test_registry_holds_each_table_row_once_and_keeps_the_old_keys() -> None:
    names = [app.name for app in KERAS_APPLICATIONS]
    assert len(names) == len(set(names)) == 40
    assert set(REGISTRY) == {*names, "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    # Caches made before the table record these; they must still match.
    assert (get_backbone("resnet101").preprocessing, get_backbone("resnet101").input_size) == ("caffe:BGR-mean", 224)
    assert (get_backbone("vgg16").preprocessing, get_backbone("vgg16").feature_dim) == ("caffe:BGR-mean", 512)
    assert get_backbone("efficientnet_lite0").preprocessing == "lite:(x-127)/128"
    assert {spec.weight_source for spec in REGISTRY.values()} == {"offline", "download"}
    assert [s.name for s in REGISTRY.values() if s.weight_source == "offline"] == [
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
    ]


def test_backbones_command_prints_a_table() -> None:
    result = run_cli("backbones", timeout=120)
    assert result.returncode == 0, result.stderr
    table, footer = result.stdout.split("\n\n")
    lines = table.splitlines()
    assert lines[0].split() == ["name", "size", "dim", "parameters", "preprocessing", "weights"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == list(REGISTRY)
    assert footer.startswith("default: efficientnet_lite0")
    assert rows["efficientnet_lite1"][1:4] == ["240", "1280", "4.19M"]
    assert rows["convnext_xlarge"][1:] == ["224", "2048", "348.15M", "included", "download"]
    assert rows["resnet101"][-2:] == ["caffe", "download"]
