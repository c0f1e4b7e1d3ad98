"""Read a legacy (pre-zip, torch<1.6) PyTorch ``state_dict`` file with numpy only.

Layout of such a file, as written by ``torch.save(..., _use_new_zipfile_serialization=False)``:

    pickle: magic number        pickle: protocol version (1001)
    pickle: sys info (endianness, type sizes)
    pickle: the object; each storage is a persistent id
            ("storage", <Type>Storage, key, location, numel, view_metadata)
    pickle: list of storage keys, in the order their bytes follow
    per key: int64 little-endian element count, then the raw elements

Unpickling is restricted to the few globals a state dict needs, so a crafted
file cannot run code: anything else raises `TlfeatError` before it is called.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlfeat.errors import TlfeatError

_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

# bfloat16 has no numpy dtype: it is read as uint16 and widened to float32.
_STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "u2",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _StorageRef:
    key: str
    kind: str
    numel: int
    # (element offset, element count) into the keyed storage when the tensor's storage is a view of it.
    view: tuple[int, int] | None


@dataclass(frozen=True)
class _TensorRef:
    """A tensor whose storage bytes come after the pickle; materialised once they are read."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(
    storage: _StorageRef,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise TlfeatError(f"tensor built from {type(storage).__name__}, not a storage")
    return _TensorRef(storage, int(storage_offset), tuple(map(int, size)), tuple(map(int, stride)))


def _rebuild_parameter(data: _TensorRef, requires_grad: bool = False, backward_hooks: Any = None) -> _TensorRef:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "collections" and name == "OrderedDict":
            from collections import OrderedDict

            return OrderedDict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise TlfeatError(f"refuses to load global {module}.{name} (only tensors are allowed)")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise TlfeatError(f"unexpected persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel, view_metadata = pid
        if not isinstance(kind, _StorageType):
            raise TlfeatError(f"persistent id with storage type {kind!r}")
        view = None
        if view_metadata is not None:
            # Old torch storage views: (view key, offset, numel) within the root storage `key`.
            _view_key, view_offset, view_numel = view_metadata
            view = (int(view_offset), int(view_numel))
        return _StorageRef(str(key), kind.name, int(numel), view)


def _unpickle(stream: io.BytesIO, what: str) -> Any:
    try:
        return _RestrictedUnpickler(stream).load()
    except TlfeatError:
        raise
    except Exception as exc:  # random bytes can raise nearly any exception from the unpickler
        detail = " ".join(str(exc).split())[:120]
        raise TlfeatError(f"cannot read {what} ({exc.__class__.__name__}: {detail})") from None


def _read_storages(
    data: bytes, start: int, keys: list[str], kinds: dict[str, str], little_endian: bool
) -> dict[str, np.ndarray]:
    order = "<" if little_endian else ">"
    storages: dict[str, np.ndarray] = {}
    pos = start
    for key in keys:
        if key not in kinds:
            # Its element size is unknown, so the bytes after it cannot be located either.
            raise TlfeatError(f"storage {key} is listed but no tensor uses it")
        if pos + 8 > len(data):
            raise TlfeatError(f"truncated: storage {key} is missing")
        numel = int(np.frombuffer(data, dtype="<i8", count=1, offset=pos)[0])
        pos += 8
        dtype = np.dtype(order + _STORAGE_DTYPES[kinds[key]])
        nbytes = numel * dtype.itemsize
        if numel < 0 or pos + nbytes > len(data):
            raise TlfeatError(f"truncated: storage {key} needs {nbytes} bytes, {len(data) - pos} left")
        array = np.frombuffer(data, dtype=dtype, count=numel, offset=pos)
        if kinds[key] == "BFloat16Storage":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        storages[key] = array
        pos += nbytes
    return storages


def _materialise(ref: _TensorRef, storages: dict[str, np.ndarray], name: str) -> np.ndarray:
    storage = ref.storage
    if storage.key not in storages:
        raise TlfeatError(f"tensor {name}: storage {storage.key} is not in the file")
    flat = storages[storage.key]
    if storage.numel > flat.size:
        raise TlfeatError(f"tensor {name}: storage {storage.key} has {flat.size} elements, expected {storage.numel}")
    base, span = storage.view if storage.view else (0, storage.numel)
    offset = base + ref.offset
    if len(ref.shape) != len(ref.stride) or any(d < 0 for d in ref.shape) or any(s < 0 for s in ref.stride):
        raise TlfeatError(f"tensor {name}: bad shape {ref.shape} / stride {ref.stride}")
    if 0 in ref.shape:
        return np.zeros(ref.shape, dtype=flat.dtype)
    # as_strided does no bounds checking, so a bad offset/stride must be caught here, not read.
    last = offset + sum((d - 1) * s for d, s in zip(ref.shape, ref.stride))
    if offset < base or base < 0 or last >= min(flat.size, base + span):
        raise TlfeatError(
            f"tensor {name}: shape {ref.shape}, stride {ref.stride}, offset {ref.offset} "
            f"reach past its storage of {span} elements"
        )
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=ref.shape, strides=tuple(s * item for s in ref.stride), writeable=False
    )
    return np.array(view, dtype=view.dtype.newbyteorder("="), order="C")


def load_legacy_torch_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a legacy-format PyTorch state dict file, by key, as numpy arrays.

    Raises `TlfeatError` (one line, naming the file) for anything else: a zip-format
    checkpoint, a pickle that asks for non-tensor globals, truncated or random bytes.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlfeatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return _parse(data)
    except TlfeatError as exc:
        raise TlfeatError(f"{path}: not a loadable legacy PyTorch state dict: {exc}") from None


def _parse(data: bytes) -> dict[str, np.ndarray]:
    if data[:4] == b"PK\x03\x04":
        raise TlfeatError("zip-format checkpoint (torch>=1.6); re-save it with _use_new_zipfile_serialization=False")
    stream = io.BytesIO(data)
    if _unpickle(stream, "magic number") != _MAGIC_NUMBER:
        raise TlfeatError("wrong magic number")
    if _unpickle(stream, "protocol version") != _PROTOCOL_VERSION:
        raise TlfeatError("unsupported protocol version")
    sys_info = _unpickle(stream, "sys info")
    if not isinstance(sys_info, dict):
        raise TlfeatError("malformed sys info")
    little_endian = bool(sys_info.get("little_endian", True))
    obj = _unpickle(stream, "state dict")
    keys = _unpickle(stream, "storage key list")
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TlfeatError("malformed storage key list")

    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise TlfeatError(f"holds a {type(obj).__name__}, not a state dict of named tensors")
    refs: dict[str, _TensorRef] = {}
    for name, value in obj.items():
        if not isinstance(value, _TensorRef):
            raise TlfeatError(f"entry {name} is a {type(value).__name__}, not a tensor")
        refs[name] = value
    kinds = {ref.storage.key: ref.storage.kind for ref in refs.values()}
    storages = _read_storages(data, stream.tell(), keys, kinds, little_endian)
    return {name: _materialise(ref, storages, name) for name, ref in refs.items()}
