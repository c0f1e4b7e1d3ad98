"""The embedding cache: one HDF5 file per (dataset, backbone), readable without Keras.

Layout (datasets at the root, N rows, D feature dims):
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
dtype, compute, decode, tta, feature_dim, keras_backend, tlfeat_version, created,
dataset_root, seed, split_ratios (JSON), split_rule, rows_finite, n_skipped.

Numeric columns carry fletcher32 checksums, checked on every read, and the structure is checked on
open (tlfeat.cache_checks): damage is a one-line error naming the file. Rows are in canonical order
(split, class, path). The file is replaced atomically (temporary name, fsync, rename) after a check of
the free space; HDF5 writes through a FirstErrorSink (a full disk is an error, not a crash).
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import h5py
import numpy as np

from tlfeat import __version__
from tlfeat.data.decode import DECODE
from tlfeat.backbones.preprocessing import NO_TTA
from tlfeat.data.scan import SPLITS
from tlfeat.cache_checks import CheckedFeatures, check_structure, checked_labels, read_column, reading, rows_meta
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
    tta: str = NO_TTA  # test-time augmentation: "flip" = mean of the image's and its mirror's features

    def describe(self) -> str:
        return (
            f"backbone={self.backbone} weights={self.weights} "
            f"input_size={self.input_size} preprocessing={self.preprocessing} dtype={self.dtype} "
            f"compute={self.compute} decode={self.decode} tta={self.tta}"
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


def _open_for_read(path: Path) -> h5py.File:
    """Open a cache, its structure checked (tlfeat.cache_checks)."""
    path = Path(path)
    if not path.exists():
        raise TlfeatError(f"{path}: cache file not found")
    try:
        handle = h5py.File(path, "r", rdcc_nbytes=READ_CHUNK_CACHE_BYTES)
        _small_metadata_cache(handle)
    except OSError as exc:
        raise TlfeatError(f"{path}: not a readable HDF5 cache ({exc.__class__.__name__})") from None
    try:
        check_structure(path, handle, _decode_attrs, key_from_attrs, FORMAT_VERSION)
    except BaseException:
        handle.close()
        raise
    return handle


def _small_metadata_cache(handle: h5py.File) -> None:
    """Cap HDF5's metadata cache (32 MiB by default) at 2 MiB: strings' heap blocks pass through it, and
    a cache reads and writes them in one pass, in order; the cap saves a writer or reader ~4 MB each."""
    config = handle.id.get_mdc_config()
    config.set_initial_size, config.initial_size = True, 1 << 20
    config.min_size, config.max_size = 1 << 20, 2 << 20
    handle.id.set_mdc_config(config)


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
        preprocessing=str(attrs["preprocessing"]), dtype=str(attrs["dtype"]),
        compute=str(attrs.get("compute", "float32")), decode=str(attrs.get("decode", OLD_DECODE)),
        tta=str(attrs.get("tta", NO_TTA)),
    )


def load(path: str | Path, split: str | None = None) -> CacheData:
    """Read a cache into memory, all rows or one split ("train", "val", "test").

    Needs only h5py and numpy. Features come back as float32 whatever the stored dtype.
    """
    if split is not None and split not in SPLITS:
        raise TlfeatError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    path = Path(path)
    with _open_for_read(path) as handle:
        split_col = read_column(path, handle["split"])
        mask = slice(None) if split is None else np.flatnonzero(split_col == split)
        meta = rows_meta(path, handle, _decode_attrs(handle), mask)
        features = np.asarray(read_column(path, handle["features"], mask), dtype=np.float32)
    return CacheData(features=features, **meta)


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
            features=np.empty((0, features.shape[1]), dtype=np.float32), **rows_meta(path, handle, _decode_attrs(handle))
        ), CheckedFeatures(path, features)


class CacheReader:
    """A cache open for reading a range of rows at a time: memory bounded by the range.

    `n_rows`, `feature_dim`, `class_names` and `attrs` are known on opening; `rows(start, stop)`
    reads only those rows of every per-row column (features as float32, like `load`).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._handle = _open_for_read(self.path)
        self.n_rows, self.feature_dim = (int(v) for v in self._handle["features"].shape)
        self.class_names = list(read_column(self.path, self._handle["class_names"]))
        self.attrs = _decode_attrs(self._handle)

    def features(self, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of the features, float32."""
        return np.asarray(read_column(self.path, self._handle["features"], np.s_[start:stop]), dtype=np.float32)

    def verify(self) -> None:
        """Read every chunk of the features once (one chunk in memory): HDF5 checks each one's checksum."""
        for start in range(0, self.n_rows, WRITE_CHUNK_ROWS):
            self.features(start, start + WRITE_CHUNK_ROWS)

    def non_finite_rows(self, chunk_rows: int = 1 << 13) -> np.ndarray:
        """Rows whose features hold NaN or inf (a cache from before such rows were refused: see `rows_finite`)."""
        if self.attrs.get("rows_finite"):
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.zeros(0, dtype=np.int64)] + [
            start + np.flatnonzero(~np.isfinite(self.features(start, start + chunk_rows)).all(axis=1))
            for start in range(0, self.n_rows, chunk_rows)
        ])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The features of distinct `rows`, in the order given, float32: one slice when they lie close
        together (at most twice their number), else just those rows."""
        order = np.argsort(rows, kind="stable")
        ascending = rows[order]
        lo, hi = int(ascending[0]), int(ascending[-1]) + 1
        features = self._handle["features"]
        with reading(self.path, "features"):
            found = features[lo:hi][ascending - lo] if hi - lo <= 2 * len(rows) else features[ascending]
        result = np.empty(found.shape, dtype=np.float32)
        result[order] = found
        return result

    def copy_rows(self, start: int, stop: int, out: np.ndarray, at: int) -> None:
        """Copy feature rows start:stop into out[at : at + stop - start] (out: float32, C order).

        float32 caches are read straight into `out` (no buffer); others through numpy's conversion
        (HDF5's own float16 conversion is many times slower).
        """
        features = self._handle["features"]
        with reading(self.path, "features"):
            if features.dtype == out.dtype and out.flags.c_contiguous:
                features.read_direct(out, np.s_[start:stop], np.s_[at : at + stop - start])
            else:
                out[at : at + stop - start] = features[start:stop]

    def rows(self, start: int, stop: int, with_features: bool = True) -> CacheData:
        """Rows start:stop; without features, an empty (0, D) array stands in for them."""
        handle, path = self._handle, self.path
        with reading(path, "paths, split and labels"):
            paths = np.array(handle["paths"].asstr()[start:stop], dtype=object)
            split = np.array(handle["split"].asstr()[start:stop], dtype=object)
            labels = handle["labels"][start:stop]
        return CacheData(
            features=self.features(start, stop if with_features else start),
            labels=checked_labels(path, labels, split, len(self.class_names)),
            paths=paths, split=split, class_names=self.class_names, attrs=self.attrs,
        )

    def identities(self, start: int, stop: int) -> tuple[list[str], list[int], list[int], list[str]]:
        """Rows start:stop's paths, file identities (size, mtime_ns) and splits: what tells a reusable row."""
        handle = self._handle
        with reading(self.path, "paths, file identities and split"):
            split = list(handle["split"].asstr()[start:stop])
            checked_labels(self.path, handle["labels"][start:stop], split, len(self.class_names))  # damage: 1 line
            return (list(handle["paths"].asstr()[start:stop]), handle["file_size"][start:stop].tolist(),
                    handle["file_mtime_ns"][start:stop].tolist(), split)

    def skipped(self) -> tuple[list[str], list[str], list[int], list[int]]:
        """The skipped files: paths, reasons, sizes, mtimes (few: read whole)."""
        column = lambda name: read_column(self.path, self._handle[name])  # noqa: E731
        return (list(column("skipped_paths")), list(column("skipped_reasons")), column("skipped_size").tolist(),
                column("skipped_mtime_ns").tolist())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "CacheReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


WRITE_CHUNK_ROWS = 1024  # rows handed to HDF5 per write: whole chunks of the features
# Rows per HDF5 chunk of the features (1 MiB at 1280-d float32). HDF5 filters (fletcher32) a whole chunk
# at a time through buffers of its size, which its free lists keep: 5 MiB chunks cost a writer 16 MB.
FILE_CHUNK_ROWS = 256
# Per dataset: holds a chunk of the features up to 4096-d float32, so runs of rows read one after another
# from the same chunk (an incremental run's reused rows) decode it once instead of once per run.
READ_CHUNK_CACHE_BYTES = FILE_CHUNK_ROWS * 2048 * 4


def write_cache(
    path: Path, key: CacheKey, features: np.ndarray | Sequence[np.ndarray], labels: np.ndarray, paths: list[str],
    split: list[str], file_size: list[int], file_mtime_ns: list[int], class_names: list[str],
    skipped: list[tuple[str, str, int, int]], extra_attrs: dict,
) -> None:
    """Write a complete cache atomically (temporary file, fsync, rename).

    `features` is an (N, D) array, or N rows of D (no (N, D) copy is made: a
    large run's rows are written a chunk at a time).
    """
    n, dim = len(features), len(features[0]) if len(features) else np.shape(features)[1]
    with CacheWriter(path, key, n, dim) as writer:
        for start in range(0, n, WRITE_CHUNK_ROWS):
            stop = start + WRITE_CHUNK_ROWS
            writer.append(np.asarray(features[start:stop]), labels[start:stop], paths[start:stop],
                          split[start:stop], file_size[start:stop], file_mtime_ns[start:stop])
        writer.commit(class_names, skipped, extra_attrs)


class CacheWriteError(TlfeatError):
    """The cache file could not be written (a full disk, mostly); the previous file is unchanged."""


class CacheWriter:
    """A cache of at most `max_rows` rows written a chunk at a time, in row order, then committed atomically.

    Nothing but the chunk in hand is held, so a cache of any size is written in bounded memory. Use
    as a context manager: the file appears under its name (`atomic_path`, durable) only when the block
    ends after `commit`; otherwise the temporary file is removed. A run that does not know yet how many
    of its images will have rows gives an upper bound; `commit` trims the columns to the rows written.
    """

    def __init__(self, path: str | Path, key: CacheKey, max_rows: int, dim: int) -> None:
        self.path, self.key, self.max_rows, self.dim, self.written = Path(path), key, max_rows, dim, 0
        self._committed = False
        self._stack = ExitStack()

    def __enter__(self) -> "CacheWriter":
        n, dim = self.max_rows, self.dim
        # An upper estimate: the features, the numeric columns, the strings' heap entries, HDF5's own.
        try:
            check_free_space(self.path.parent, n * (dim * np.dtype(self.key.dtype).itemsize + 184) + (1 << 20),
                             self.path.name)
        except TlfeatError as exc:
            raise CacheWriteError(str(exc)) from None
        try:
            self._open(n, dim)
        except BaseException as exc:  # a full disk already: cleaned up (and said) as at the end
            self.__exit__(type(exc), exc, None)
            raise
        return self

    def _open(self, n: int, dim: int) -> None:
        tmp = self._stack.enter_context(atomic_path(self.path, durable=True))
        raw = self._stack.enter_context(open(tmp, "wb+", buffering=0))
        self._sink = FirstErrorSink(raw)  # a write failing inside HDF5 would crash the interpreter later
        self._handle = handle = h5py.File(self._sink, "w")
        _small_metadata_cache(handle)
        # fletcher32: HDF5 checks every chunk on read, so damaged numbers raise instead of passing as data.
        handle.create_dataset("features", shape=(n, dim), dtype=self.key.dtype, maxshape=(None, dim),
                              chunks=(max(1, min(n, FILE_CHUNK_ROWS)), dim), fletcher32=True)
        for name, dtype in (("labels", np.int32), ("file_size", np.int64), ("file_mtime_ns", np.int64)):
            _numbers(handle, name, np.zeros(0, dtype=dtype), n)
        for name in _STRING_COLUMNS:  # chunked, so that `commit` can trim them; a chunk per append (HDF5
            # rewrites a partly written chunk of strings whole, each string anew)
            handle.create_dataset(name, shape=(n,), dtype=_STR, maxshape=(None,),
                                  chunks=(max(1, min(n, WRITE_CHUNK_ROWS)),))

    def append(
        self, features: np.ndarray, labels: Sequence[int], paths: Sequence[str], split: Sequence[str],
        file_size: Sequence[int], file_mtime_ns: Sequence[int],
    ) -> None:
        """The next rows (chunks of WRITE_CHUNK_ROWS rows keep the writes aligned with the file's chunks)."""
        start, stop = self.written, self.written + len(features)
        if stop > self.max_rows:
            raise ValueError(f"{stop} rows written to a cache of at most {self.max_rows}")
        if stop == start:
            return
        if self._sink.error is not None:
            raise self._sink.error  # stop at once: the sink holds what HDF5 writes from here on in memory
        if not np.isfinite(features).all():
            raise ValueError("non-finite features given to CacheWriter (extraction skips those images)")
        handle = self._handle
        # numpy converts: HDF5's float16 rounding differs
        handle["features"][start:stop] = np.asarray(features).astype(self.key.dtype, copy=False)
        handle["labels"][start:stop] = np.asarray(labels, dtype=np.int32)
        handle["paths"][start:stop] = list(paths)
        handle["split"][start:stop] = list(split)
        handle["file_size"][start:stop] = np.asarray(file_size, dtype=np.int64)
        handle["file_mtime_ns"][start:stop] = np.asarray(file_mtime_ns, dtype=np.int64)
        self.written = stop

    def commit(self, class_names: list[str], skipped: list[tuple[str, str, int, int]], extra_attrs: dict) -> None:
        """Finish the file with the rows written so far; it replaces `path` when the `with` block ends."""
        handle = self._handle
        if self.written != self.max_rows:
            for name in ("features", "labels", "file_size", "file_mtime_ns", *_STRING_COLUMNS):
                handle[name].resize(self.written, axis=0)
        handle.create_dataset("class_names", data=list(class_names), dtype=_STR)
        handle.create_dataset("skipped_paths", data=[s[0] for s in skipped], dtype=_STR)
        handle.create_dataset("skipped_reasons", data=[s[1] for s in skipped], dtype=_STR)
        _numbers(handle, "skipped_size", np.asarray([s[2] for s in skipped], dtype=np.int64))
        _numbers(handle, "skipped_mtime_ns", np.asarray([s[3] for s in skipped], dtype=np.int64))
        attrs = {
            "format_version": FORMAT_VERSION,
            **asdict(self.key),
            "feature_dim": self.dim,
            "tlfeat_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "n_skipped": len(skipped),
            "rows_finite": True,  # `append` refuses NaN and inf: a rerun need not look for them
            **extra_attrs,
        }
        for name, value in attrs.items():
            handle.attrs[name] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
        self._committed = True

    def __exit__(self, *exc: object) -> None:
        if hasattr(self, "_handle"):
            self._handle.close()
        if exc[0] is None and (self._sink.error is not None or not self._committed):
            failure = self._sink.error or RuntimeError("cache not committed")
            exc = (type(failure), failure, None)
        try:
            self._stack.__exit__(*exc)  # renames the finished file into place, or removes it
        except (OSError, RuntimeError) as failure:  # a failed fsync or rename
            exc = (type(failure), failure, None)
        if exc[0] is not None and issubclass(exc[0], (OSError, RuntimeError)):  # a full disk, mostly
            raise CacheWriteError(f"{self.path}: cannot write the cache ({os_reason(exc[1])}); "
                                  "the previous file is unchanged") from None


_STRING_COLUMNS = ("paths", "split")


def _column_chunk(n: int) -> int:
    return max(1, min(n, 1 << 16))


def _numbers(handle: h5py.File, name: str, values: np.ndarray, n: int | None = None) -> None:
    """A 1-D numeric column with an HDF5 checksum (checksums need chunked storage): `values`, or `n`
    zeros to be written later (HDF5's fill value: nothing is held for them)."""
    n = len(values) if n is None else n
    handle.create_dataset(name, shape=(n,), dtype=values.dtype, data=values if len(values) == n else None,
                          chunks=(_column_chunk(n),), maxshape=(None,), fletcher32=True)
