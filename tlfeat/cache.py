"""The embedding cache: one HDF5 file per (dataset, backbone), readable without Keras.

Layout (all datasets at the root of the file, N rows, D feature dims):

    features        (N, D) float32 or float16, chunked by rows, fletcher32 checksums
    labels          (N,)   int32, index into class_names
    paths           (N,)   UTF-8 str, relative to the dataset root, '/' separated
    split           (N,)   UTF-8 str, "train" | "val" | "test"
    file_size       (N,)   int64, bytes of the image file when it was embedded
    file_mtime_ns   (N,)   int64, modification time of the image file (ns)
    class_names     (C,)   UTF-8 str, sorted
    skipped_paths, skipped_reasons (S,) UTF-8 str: files that failed, and why (one line each)
    skipped_size, skipped_mtime_ns (S,) int64

Root attributes: format_version, backbone, weights, input_size, preprocessing,
dtype, compute, decode, feature_dim, keras_backend, tlfeat_version, created,
dataset_root, seed, split_ratios (JSON), split_rule, n_skipped.

Numeric columns carry HDF5 fletcher32 checksums; reading checks them, and the
structure (format version, columns, row counts, key attributes, label range) on
open, so a damaged file is a one-line error naming it, never data. Rows are in a
canonical order (split, class, path): a resumed run writes an uninterrupted one's file.

Crash safety: the file is only replaced atomically (a temporary name, fsync,
rename), after a check of the free space; a run's work in progress is in
``<out>.parts/`` (tlfeat.extraction.shards).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from tlfeat import __version__
from tlfeat.data.decode import DECODE
from tlfeat.data.scan import SPLITS
from tlfeat.errors import TlfeatError
from tlfeat.fileio import FirstErrorSink, atomic_path, check_free_space, os_reason

FORMAT_VERSION = 1
OLD_DECODE = "pillow-bilinear"  # what caches and shards with no "decode" record were decoded with
_STR = h5py.string_dtype(encoding="utf-8")


@dataclass(frozen=True)
class CacheKey:
    """What produced the features; two caches with different keys never mix."""

    backbone: str
    weights: str
    input_size: int
    preprocessing: str
    dtype: str = "float32"  # how features are stored
    compute: str = "float32"  # how they were computed: "float32", or "mixed_bfloat16" on a GPU
    decode: str = DECODE  # how files became pixels (tlfeat.data.decode)

    def describe(self) -> str:
        return (
            f"backbone={self.backbone} weights={self.weights} "
            f"input_size={self.input_size} preprocessing={self.preprocessing} dtype={self.dtype} "
            f"compute={self.compute} decode={self.decode}"
        )

    def differences(self, other: "CacheKey") -> str:
        """Human-readable 'field: ours vs theirs' for the fields that differ."""
        mine, theirs = asdict(self), asdict(other)
        return ", ".join(f"{k} {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k])


@dataclass
class CacheData:
    """Rows of a cache (optionally one split) held in memory."""

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    split: np.ndarray
    class_names: list[str]
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, split: str) -> "CacheData":
        mask = self.split == split
        return CacheData(
            self.features[mask], self.labels[mask], self.paths[mask], self.split[mask],
            self.class_names, self.attrs,
        )


@dataclass
class Rows:
    """Embedded images plus skipped files, as produced by extraction (one shard or a whole cache)."""

    paths: list[str]
    features: np.ndarray  # (n, D)
    file_size: list[int]
    file_mtime_ns: list[int]
    skipped_paths: list[str] = field(default_factory=list)
    skipped_reasons: list[str] = field(default_factory=list)
    skipped_size: list[int] = field(default_factory=list)
    skipped_mtime_ns: list[int] = field(default_factory=list)


_ROW_COLUMNS = ("labels", "paths", "split", "file_size", "file_mtime_ns")
_SKIP_COLUMNS = ("skipped_paths", "skipped_reasons", "skipped_size", "skipped_mtime_ns")
_KEY_ATTRS = ("backbone", "weights", "input_size", "preprocessing", "dtype")
_REBUILD = "rebuild it with extract --overwrite"


def _open_for_read(path: Path) -> h5py.File:
    """Open a cache and check its structure (version, columns, row counts, key attributes): one-line errors."""
    path = Path(path)
    if not path.exists():
        raise TlfeatError(f"{path}: cache file not found")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise TlfeatError(f"{path}: not a readable HDF5 cache ({exc.__class__.__name__})") from None
    try:
        _check_structure(path, handle)
    except BaseException:
        handle.close()
        raise
    return handle


def _check_structure(path: Path, handle: h5py.File) -> None:
    try:
        attrs = _decode_attrs(handle)
        present = set(handle.keys())
    except (OSError, RuntimeError, KeyError, ValueError) as exc:  # a damaged object header or attribute
        raise TlfeatError(f"{path}: damaged cache: its attributes cannot be read ({exc.__class__.__name__}); {_REBUILD}") from None
    if "format_version" not in attrs or "features" not in present:
        raise TlfeatError(f"{path}: HDF5 file is not a tlfeat cache (no features/format_version)")
    version = attrs["format_version"]
    if not isinstance(version, int) or version < 1:
        raise TlfeatError(f"{path}: damaged cache: format_version {version!r} is not a version number; {_REBUILD}")
    if version > FORMAT_VERSION:
        raise TlfeatError(
            f"{path}: written by a newer tlfeat (cache format version {version}; this tlfeat reads up to "
            f"{FORMAT_VERSION}): upgrade tlfeat to read it"
        )
    missing = [n for n in (*_ROW_COLUMNS, "class_names", *_SKIP_COLUMNS) if n not in present]
    missing += [f"attribute {n}" for n in _KEY_ATTRS if n not in attrs]
    if missing:
        raise TlfeatError(f"{path}: damaged cache: {', '.join(missing)} missing; {_REBUILD}")
    try:
        key_from_attrs(attrs)
    except (TypeError, ValueError):
        raise TlfeatError(f"{path}: damaged cache: its key attributes do not parse; {_REBUILD}") from None
    features = handle["features"]
    if features.ndim != 2:
        raise TlfeatError(f"{path}: damaged cache: features has shape {features.shape}, not (rows, dims); {_REBUILD}")
    counts = {n: len(handle[n]) for n in (*_ROW_COLUMNS, *_SKIP_COLUMNS)}
    wrong = [f"{n} {c}" for n, c in counts.items() if n in _ROW_COLUMNS and c != features.shape[0]]
    wrong += [f"{n} {c}" for n, c in counts.items() if n in _SKIP_COLUMNS and c != counts["skipped_paths"]]
    if wrong:
        raise TlfeatError(
            f"{path}: damaged cache: row counts disagree (features {features.shape[0]}, {', '.join(wrong)}); {_REBUILD}"
        )
    if attrs.get("feature_dim", features.shape[1]) != features.shape[1]:
        raise TlfeatError(
            f"{path}: damaged cache: feature_dim {attrs['feature_dim']} but features have {features.shape[1]} "
            f"columns; {_REBUILD}"
        )


def _read_column(path: Path, dataset: h5py.Dataset, index: slice | np.ndarray = slice(None)) -> np.ndarray:
    """Values of a dataset; damaged data (an HDF5 checksum or decoding failure) is a one-line error."""
    try:
        if h5py.check_string_dtype(dataset.dtype) is not None:
            return np.array(dataset.asstr()[...], dtype=object)[index] if len(dataset) else np.array([], dtype=object)
        return dataset[index]
    except (OSError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise TlfeatError(
            f"{path}: damaged cache: {dataset.name.lstrip('/')} fails its checksum or cannot be read "
            f"({os_reason(exc)}); {_REBUILD}"
        ) from None


def _checked_labels(path: Path, labels: np.ndarray, split: np.ndarray, n_classes: int) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if len(bad):
        raise TlfeatError(
            f"{path}: damaged cache: label {labels[bad[0]]} at row {bad[0]} is outside its {n_classes} classes "
            f"({len(bad)} such rows); {_REBUILD}"
        )
    unknown = sorted(set(split.tolist()) - set(SPLITS))
    if unknown:
        raise TlfeatError(f"{path}: damaged cache: split values {unknown} are not train/val/test; {_REBUILD}")
    return labels


def read_attrs(path: str | Path) -> dict:
    """Root attributes of a cache, JSON-decoded where stored as JSON."""
    with _open_for_read(Path(path)) as handle:
        return _decode_attrs(handle)


def _decode_attrs(handle: h5py.File) -> dict:
    attrs = {}
    for name, value in handle.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, np.generic):
            value = value.item()
        attrs[name] = value
    if isinstance(attrs.get("split_ratios"), str):
        attrs["split_ratios"] = json.loads(attrs["split_ratios"])
    return attrs


def read_key(path: str | Path) -> CacheKey:
    attrs = read_attrs(path)
    return key_from_attrs(attrs)


def key_from_attrs(attrs: dict) -> CacheKey:
    return CacheKey(
        backbone=str(attrs["backbone"]), weights=str(attrs["weights"]), input_size=int(attrs["input_size"]),
        preprocessing=str(attrs["preprocessing"]), dtype=str(attrs["dtype"]), compute=str(attrs.get("compute", "float32")),
        decode=str(attrs.get("decode", OLD_DECODE)),
    )


def _rows_meta(path: Path, handle: h5py.File, index: slice | np.ndarray = slice(None)) -> dict:
    """labels, paths, split, class_names and attrs of (some) rows, checked."""
    split = _read_column(path, handle["split"], index)
    class_names = list(_read_column(path, handle["class_names"]))
    labels = _checked_labels(path, _read_column(path, handle["labels"], index), split, len(class_names))
    return dict(labels=labels, paths=_read_column(path, handle["paths"], index), split=split,
                class_names=class_names, attrs=_decode_attrs(handle))


def load(path: str | Path, split: str | None = None) -> CacheData:
    """Read a cache into memory, all rows or one split ("train", "val", "test").

    Needs only h5py and numpy. Features come back as float32 whatever the stored dtype.
    """
    if split is not None and split not in SPLITS:
        raise TlfeatError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    path = Path(path)
    with _open_for_read(path) as handle:
        split_col = _read_column(path, handle["split"])
        mask = slice(None) if split is None else np.flatnonzero(split_col == split)
        meta = _rows_meta(path, handle, mask)
        features = np.asarray(_read_column(path, handle["features"], mask), dtype=np.float32)
    return CacheData(features=features, **meta)


class CheckedFeatures:
    """An open cache's `features`, read in slices; damaged data is a one-line error naming the file."""

    def __init__(self, path: Path, dataset: h5py.Dataset) -> None:
        self.path, self.dataset = path, dataset
        self.shape, self.dtype = dataset.shape, dataset.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        return _read_column(self.path, self.dataset, index)


@contextmanager
def open_rows(path: str | Path) -> Iterator[tuple[CacheData, CheckedFeatures]]:
    """A cache's rows without their features, and its open `features` to read in slices.

    For caches larger than memory: the returned CacheData holds labels, paths, split,
    class names and attributes, and an empty (0, D) features array.
    """
    path = Path(path)
    with _open_for_read(path) as handle:
        features = handle["features"]
        yield CacheData(
            features=np.empty((0, features.shape[1]), dtype=np.float32), **_rows_meta(path, handle)
        ), CheckedFeatures(path, features)


def read_rows(path: str | Path) -> tuple[CacheKey, Rows]:
    """Everything extraction needs to reuse an existing cache: its key and its rows.

    Rows whose features are not finite (a cache written before they were refused) come back as skipped.
    """
    path = Path(path)
    with _open_for_read(path) as handle:
        key = key_from_attrs(_decode_attrs(handle))

        def column(name: str) -> np.ndarray:
            return _read_column(path, handle[name])

        rows = Rows(
            paths=list(column("paths")),
            features=np.asarray(column("features")),
            file_size=[int(v) for v in column("file_size")],
            file_mtime_ns=[int(v) for v in column("file_mtime_ns")],
            skipped_paths=list(column("skipped_paths")),
            skipped_reasons=list(column("skipped_reasons")),
            skipped_size=[int(v) for v in column("skipped_size")],
            skipped_mtime_ns=[int(v) for v in column("skipped_mtime_ns")],
        )
    return key, without_non_finite(rows)


def without_non_finite(rows: Rows) -> Rows:
    """`rows` with every row whose features hold NaN or inf moved to the skipped files, with the reason."""
    finite = np.isfinite(rows.features).all(axis=1) if len(rows.paths) else np.ones(0, dtype=bool)
    if finite.all():
        return rows
    keep, drop = np.flatnonzero(finite), np.flatnonzero(~finite)
    return Rows(
        paths=[rows.paths[i] for i in keep],
        features=rows.features[keep],
        file_size=[rows.file_size[i] for i in keep],
        file_mtime_ns=[rows.file_mtime_ns[i] for i in keep],
        skipped_paths=rows.skipped_paths + [rows.paths[i] for i in drop],
        skipped_reasons=rows.skipped_reasons + [NON_FINITE_REASON] * len(drop),
        skipped_size=rows.skipped_size + [rows.file_size[i] for i in drop],
        skipped_mtime_ns=rows.skipped_mtime_ns + [rows.file_mtime_ns[i] for i in drop],
    )


NON_FINITE_REASON = "the backbone gave NaN or inf features for this image"


WRITE_CHUNK_ROWS = 1024


def write_cache(
    path: Path,
    key: CacheKey,
    features: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray,
    paths: list[str],
    split: list[str],
    file_size: list[int],
    file_mtime_ns: list[int],
    class_names: list[str],
    skipped: list[tuple[str, str, int, int]],
    extra_attrs: dict,
) -> None:
    """Write a complete cache atomically (temporary file, fsync, rename).

    `features` is an (N, D) array, or N rows of D (no (N, D) copy is made: a
    large run's rows are written a chunk at a time).
    """
    path = Path(path)
    n, dim = len(features), len(features[0]) if len(features) else np.shape(features)[1]
    check_free_space(path.parent, _estimated_bytes(n, dim, np.dtype(key.dtype).itemsize, paths, skipped), path.name)
    try:
        _write(path, key, features, n, dim, labels, paths, split, file_size, file_mtime_ns, class_names, skipped,
               extra_attrs)
    except (OSError, RuntimeError, ValueError) as exc:  # h5py reports a full disk as OSError or RuntimeError
        raise TlfeatError(f"{path}: cannot write the cache ({os_reason(exc)}); the previous file is unchanged") from None


def _estimated_bytes(n: int, dim: int, itemsize: int, paths: list[str], skipped: list[tuple]) -> int:
    """An upper estimate of a cache file's size: the features, the columns, the strings' heap entries."""
    strings = sum(len(p.encode()) + 48 for p in paths) + sum(len(s[0].encode()) + len(s[1].encode()) + 96 for s in skipped)
    return n * dim * itemsize + n * 24 + strings + (1 << 20)


def _write(
    path: Path, key: CacheKey, features: np.ndarray | Sequence[np.ndarray], n: int, dim: int, labels: np.ndarray,
    paths: list[str], split: list[str], file_size: list[int], file_mtime_ns: list[int], class_names: list[str],
    skipped: list[tuple[str, str, int, int]], extra_attrs: dict,
) -> None:
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb+", buffering=0) as raw:
        sink = FirstErrorSink(raw)  # HDF5 never sees a failed write: one leaves it in a state that crashes at exit
        with h5py.File(sink, "w") as handle:
            # fletcher32: HDF5 checks every chunk on read, so damaged numbers raise instead of passing as data.
            stored = handle.create_dataset(
                "features", shape=(n, dim), dtype=key.dtype, chunks=(max(1, min(n, WRITE_CHUNK_ROWS)), dim),
                maxshape=(None, dim), fletcher32=True,
            )
            for start in range(0, n, WRITE_CHUNK_ROWS):  # numpy converts: HDF5's float16 rounding differs
                if sink.error is not None:
                    raise sink.error  # stop at once: the sink holds what HDF5 writes from here on in memory
                chunk = np.asarray(features[start : start + WRITE_CHUNK_ROWS])
                stored[start : start + WRITE_CHUNK_ROWS] = chunk.astype(key.dtype, copy=False)
            _numbers(handle, "labels", np.asarray(labels, dtype=np.int32))
            handle.create_dataset("paths", data=list(paths), dtype=_STR)
            handle.create_dataset("split", data=list(split), dtype=_STR)
            _numbers(handle, "file_size", np.asarray(file_size, dtype=np.int64))
            _numbers(handle, "file_mtime_ns", np.asarray(file_mtime_ns, dtype=np.int64))
            handle.create_dataset("class_names", data=list(class_names), dtype=_STR)
            handle.create_dataset("skipped_paths", data=[s[0] for s in skipped], dtype=_STR)
            handle.create_dataset("skipped_reasons", data=[s[1] for s in skipped], dtype=_STR)
            _numbers(handle, "skipped_size", np.asarray([s[2] for s in skipped], dtype=np.int64))
            _numbers(handle, "skipped_mtime_ns", np.asarray([s[3] for s in skipped], dtype=np.int64))
            attrs = {
                "format_version": FORMAT_VERSION,
                **asdict(key),
                "feature_dim": dim,
                "tlfeat_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "n_skipped": len(skipped),
                **extra_attrs,
            }
            for name, value in attrs.items():
                handle.attrs[name] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
        if sink.error is not None:
            raise sink.error


def _numbers(handle: h5py.File, name: str, values: np.ndarray) -> None:
    """A 1-D numeric column with an HDF5 checksum (checksums need chunked storage)."""
    handle.create_dataset(name, data=values, chunks=(max(1, min(len(values), 1 << 16)),), maxshape=(None,),
                          fletcher32=True)
