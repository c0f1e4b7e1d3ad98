"""Backbones: one registry of records (input size, preprocessing, feature dim, weight source), the offline
EfficientNet-Lite port and the torch-free reader of its weights."""

from tlfeat.backbones.registry import (
    DEFAULT_BACKBONE, MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, REGISTRY, Backbone, build_model, get_backbone,
    list_backbones, random_weights_backend, resolve_image_size, weights_identity,
    weights_source,
)

__all__ = ["DEFAULT_BACKBONE", "MAX_IMAGE_SIZE", "MIN_IMAGE_SIZE", "REGISTRY", "Backbone", "build_model",
           "get_backbone", "list_backbones", "random_weights_backend", "resolve_image_size", "weights_identity",
           "weights_source"]
