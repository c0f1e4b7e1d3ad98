"""The backbone registry: one record per pretrained CNN, builder and preprocessing side by side.

The records come from two tables: the offline EfficientNet-Lite variants
(tlfeat.backbones.efficientnet_lite.VARIANTS) and every keras.applications model with
pooled features (tlfeat.backbones.keras_applications). Keras is imported only when a
model is actually built, so the registry can be listed cheaply.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tlfeat.errors import TlfeatError, integer
from tlfeat.fileio import describe_exception, sha256_file
from tlfeat.backbones.preprocessing import PREPROCESSING, Preprocessing
from tlfeat.seeding import seeded

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
    `preprocessor` maps float32 RGB in 0..255, shape (N, H, W, 3), to model input.
    """

    name: str
    builder: Callable[[str | None, tuple[int, int, int]], Any] = field(repr=False)
    preprocessor: Preprocessing = field(repr=False)
    input_size: int
    feature_dim: int
    parameters: int  # of the pooled feature model
    weight_source: str  # "offline" (shipped by an installed package) or "download" (keras.applications)
    imagenet_identity: Callable[[], str] = field(default=lambda: "imagenet", repr=False)
    # Base layers `finetune` unfreezes in stage 2 by default (counted from the end); None: no default.
    unfreeze_top: int | None = None

    @property
    def preprocess(self) -> Callable[[np.ndarray], np.ndarray]:
        return self.preprocessor.apply

    @property
    def preprocessing(self) -> str:
        """What caches and heads record for the preprocessing."""
        return self.preprocessor.key


def _efficientnet_lite(name: str, weights: str | None, input_shape: tuple[int, int, int]) -> Any:
    from tlfeat.backbones import efficientnet_lite

    return efficientnet_lite.build_efficientnet_lite(
        name, input_shape=input_shape, include_top=False, pooling="avg", weights=weights
    )


def _efficientnet_lite_identity(name: str) -> str:
    from tlfeat.backbones import lite_weights

    return lite_weights.imagenet_weights_identity(name)


# Pooled feature models, as count_params() gives them (tests/test_efficientnet_lite.py checks).
_LITE_PARAMETERS = (3_413_024, 4_189_344, 4_869_168)
# finetune's default share to unfreeze, where one was chosen: for Lite0, stages 6-7 and the head
# (from block6a_expand_conv), like the study's top share; the study's own for ResNet101 and VGG16.
_UNFREEZE_TOP = {"efficientnet_lite0": 47, "resnet101": 146, "vgg16": 10}


def _lite_records() -> list[Backbone]:
    from tlfeat.backbones.lite_architecture import HEAD_CHANNELS, VARIANTS

    return [
        Backbone(
            name=variant.name,
            builder=functools.partial(_efficientnet_lite, variant.name),
            preprocessor=PREPROCESSING["lite"],
            input_size=variant.input_size,
            feature_dim=HEAD_CHANNELS,
            parameters=parameters,
            weight_source="offline",
            imagenet_identity=functools.partial(_efficientnet_lite_identity, variant.name),
            unfreeze_top=_UNFREEZE_TOP.get(variant.name),
        )
        for variant, parameters in zip(VARIANTS.values(), _LITE_PARAMETERS, strict=True)
    ]


def _keras_records() -> list[Backbone]:
    from tlfeat.backbones.keras_applications import KERAS_APPLICATIONS, build_keras_application

    return [
        Backbone(
            name=app.name,
            builder=functools.partial(build_keras_application, app.keras_class),
            preprocessor=PREPROCESSING[app.preprocessing],
            input_size=app.input_size,
            feature_dim=app.feature_dim,
            parameters=app.parameters,
            weight_source="download",
            unfreeze_top=_UNFREEZE_TOP.get(app.name),
        )
        for app in KERAS_APPLICATIONS
    ]


REGISTRY: dict[str, Backbone] = {b.name: b for b in (*_lite_records(), *_keras_records())}


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
    requested = integer("image_size", requested)
    if not MIN_IMAGE_SIZE <= requested <= MAX_IMAGE_SIZE:
        raise TlfeatError(
            f"`image_size={requested}`: {backbone.name} takes {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels "
            f"(default {backbone.input_size})"
        )
    return requested


def weights_file(weights: str) -> Path:
    """`weights` when it names a file (not imagenet or none); a one-line error otherwise."""
    path = Path(weights)
    if path.is_dir():
        raise TlfeatError(f"{weights}: is a folder; `weights` takes imagenet, none or a weights file")
    if not path.is_file():
        raise TlfeatError(f"{weights}: weights file not found (use imagenet, none or a file path)")
    return path


def weights_source(weights: str) -> str:
    """`weights` as a cache or run records it, and as another process opens it: imagenet and none as they
    are, a file by its absolute path (a Ray worker's working folder is not the driver's)."""
    return weights if weights in ("imagenet", "none") else str(Path(weights).resolve())


def weights_identity(backbone: Backbone, weights: str) -> str:
    """What the cache records for these weights: "none:<keras backend>", the ImageNet identity, or a file's
    sha256. Random weights are one model per backend (each draws them with its own generator), so a run under
    another backend never adds its rows to theirs."""
    if weights == "none":
        import keras

        return f"none:{keras.backend.backend()}"
    if weights == "imagenet":
        return backbone.imagenet_identity()
    return "sha256:" + sha256_file(weights_file(weights))


def random_weights_backend(identity: str) -> str | None:
    """The Keras backend whose random weights a recorded weights identity names, or None for other weights."""
    return identity.split(":", 1)[1] if identity.startswith("none:") else None


def build_model(backbone: Backbone, weights: str, image_size: int | None = None) -> Any:
    """The Keras feature extractor for `backbone` with `weights` = "imagenet" | "none" | a file path."""
    size = image_size or backbone.input_size
    input_shape = (size, size, 3)
    if weights == "none":
        # A fixed seed makes "random weights" one reproducible model, so a resumed
        # or incremental run never mixes features from two different initialisations.
        with seeded(RANDOM_WEIGHTS_SEED):
            return backbone.builder(None, input_shape)
    if weights == "imagenet":
        try:
            return backbone.builder("imagenet", input_shape)
        except TlfeatError:
            raise
        except Exception as exc:  # keras.utils.get_file raises a bare Exception on network failure
            # Keras' message names the URL it tried: that file, copied into its cache, is all it needs.
            hint = (
                "; offline, download that file on a machine with network and copy it into ~/.keras/models/, "
                "or pass `weights=PATH`" if backbone.weight_source == "download" else ""
            )
            raise TlfeatError(
                f"could not get ImageNet weights for {backbone.name} ({describe_exception(exc, limit=None)}){hint}"
            ) from None
    path = weights_file(weights)
    model = backbone.builder(None, input_shape)
    try:
        model.load_weights(str(path))
    except Exception as exc:
        raise TlfeatError(
            f"{path}: cannot load as {backbone.name} weights ({describe_exception(exc)})"
        ) from None
    return model


def list_backbones() -> list[Backbone]:
    """Every registered backbone in table order: the offline EfficientNet-Lite ones (the default first), then Keras'."""
    return sorted(REGISTRY.values(), key=lambda b: b.name != DEFAULT_BACKBONE)
