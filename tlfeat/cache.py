"""The embedding cache: one HDF5 file per (dataset, backbone), readable without Keras.

Layout (datasets at the root, N rows, D feature dims):
    features        (N, D) float32 or float16, HDF5 chunks of 256 rows, fletcher32 checksums
    labels          (N,)   int32, index into class_names
    paths           (N,)   UTF-8 str, relative to the dataset root, '/' separated
    split           (N,)   UTF-8 str, "train" | "val" | "test"
    file_size       (N,)   int64, bytes of the image file when it was embedded
    file_mtime_ns   (N,)   int64, modification time of the image file (ns)
    file_ino        (N,)   int64, its inode number (a symlink's target's), -1 if not recorded
    file_ctime_ns   (N,)   int64, its status-change time (ns), -1 if not recorded
    file_sha256     (N, 32) uint8, SHA-256 of the exact bytes the features were computed from (zeros: not
                    recorded); these three are absent from caches written before tlfeat kept them
    class_names     (C,)   UTF-8 str, sorted
    skipped_paths, skipped_reasons (S,) UTF-8 str: files that failed, and why (one line each)
    skipped_size, skipped_mtime_ns (S,) int64

Root attributes: format_version, backbone, weights, input_size, preprocessing,
dtype, compute, decode, tta, feature_dim, keras_backend, tlfeat_version, created,
dataset_root, seed, split_ratios (JSON), split_rule, rows_finite, n_skipped.

Numeric columns carry fletcher32 checksums, checked on every read, and the structure is checked on
open (tlfeat.cache_checks): damage is a one-line error naming the file. Rows are in canonical order
(split, class, path). tlfeat.cache_writer writes the file: atomically (temporary name, fsync, rename)
after a check of the free space, through a FirstErrorSink (a full disk is an error, not a crash).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from tlfeat.data.decode import DECODE
from tlfeat.backbones.preprocessing import NO_TTA
from tlfeat.data.scan import SPLITS
from tlfeat.cache_checks import CheckedFeatures, check_structure, checked_labels, read_column, reading, rows_meta
from tlfeat.errors import TlfeatError
from tlfeat.fileio import describe_exception, path_value

FORMAT_VERSION = 1
OLD_DECODE = "pillow-bilinear"  # what caches and shards with no "decode" record were decoded with
STRING_DTYPE = h5py.string_dtype(encoding="utf-8")
WRITE_CHUNK_ROWS = 1024  # rows handed to HDF5 per write: whole chunks of the features
# Rows per HDF5 chunk of the features (1 MiB at 1280-d float32). HDF5 filters (fletcher32) a whole chunk
# at a time through buffers of its size, which its free lists keep: 5 MiB chunks cost a writer 16 MB.
FILE_CHUNK_ROWS = 256
# Per dataset: holds one chunk of the features up to 2048-d float32, so runs of rows read one after another
# from the same chunk (an incremental run's reused rows) decode it once instead of once per run.
READ_CHUNK_CACHE_BYTES = FILE_CHUNK_ROWS * 2048 * 4


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

    def differences(self, other: "CacheKey") -> str:
        """Human-readable 'field: ours vs theirs' for the fields that differ."""
        mine, theirs = asdict(self), asdict(other)
        return ", ".join(f"{k} {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k])


def check_split(split: str) -> None:
    """One of "train", "val", "test", else a one-line error."""
    if split not in SPLITS:
        raise TlfeatError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")


@dataclass(eq=False)  # arrays have no single truth value: two CacheData compare by identity
class CacheData:
    """Rows of a cache (optionally one split) held in memory.

    features: (N, D) float32 (float16 caches are read as stored); labels: (N,) int indices into
    `class_names`; paths: (N,) relative paths (str); split: (N,) "train", "val" or "test"; attrs: the
    cache's attributes (its key, dataset root, split seed and shares, ...; README "The cache format").
    """

    features: np.ndarray
    labels: np.ndarray
    paths: np.ndarray
    split: np.ndarray
    class_names: list[str]
    attrs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        counts = ", ".join(f"{name} {int((self.split == name).sum())}" for name in SPLITS if (self.split == name).any())
        shape = getattr(self.features, "shape", ())
        return (f"CacheData({len(self)} rows x {shape[1] if len(shape) == 2 else '?'} features, "
                f"{len(self.class_names)} classes; {counts or 'no rows'}; backbone {self.attrs.get('backbone', '?')})")

    def select(self, split: str) -> "CacheData":
        """The rows of one split ("train", "val" or "test")."""
        check_split(split)
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
    # Per row: the file's inode number and status-change time (-1: not recorded), and the SHA-256 of the
    # bytes its features were computed from ((n, 32) uint8; None or a zero row: not recorded).
    file_ino: list[int] | None = None
    file_ctime_ns: list[int] | None = None
    file_sha256: np.ndarray | None = None


def read_sorted_rows(dataset: h5py.Dataset, rows: np.ndarray, slack: int) -> np.ndarray:
    """Rows (ascending indices) of an HDF5 dataset. Rows spanning at most `slack` more rows than their number
    are read as one slice and picked in memory: h5py's point selection is far slower per row, and the extra
    rows read are bounded by `slack`."""
    if len(rows) and rows[-1] - rows[0] < len(rows) + slack:
        return dataset[rows[0] : rows[-1] + 1][rows - rows[0]]
    return dataset[rows]


def _open_for_read(path: Path) -> h5py.File:
    """Open a cache, its structure checked (tlfeat.cache_checks)."""
    path = Path(path)
    if not path.exists():
        raise TlfeatError(f"{path}: cache file not found")
    if path.is_dir():  # h5py's first line would say "file read failed: time = <now>"
        raise TlfeatError(f"{path}: is a folder, not a cache file (a .h5 written by extract)")
    try:
        handle = h5py.File(path, "r", rdcc_nbytes=READ_CHUNK_CACHE_BYTES)
        small_metadata_cache(handle)
    except OSError as exc:
        # h5py's reason says what is wrong with the file (a truncated copy, a lock held elsewhere): keep it.
        raise TlfeatError(f"{path}: not a readable HDF5 cache ({describe_exception(exc)})") from None
    try:
        check_structure(path, handle, _decode_attrs, key_from_attrs, FORMAT_VERSION)
    except BaseException:
        handle.close()
        raise
    return handle


def small_metadata_cache(handle: h5py.File) -> None:
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
    """Read the cache file at `path` into memory, all rows or one split ("train", "val", "test").

    Needs only h5py and numpy. Features come back as float32 whatever the stored dtype.
    """
    path = path_value("path", path)
    if split is not None:
        check_split(split)
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

    def file_stats(self, start: int, stop: int) -> tuple[list[int], list[int], np.ndarray] | None:
        """Rows start:stop's inode numbers, status-change times and SHA-256 digests ((n, 32) uint8; -1 and
        zeros where not recorded); None for a cache written before tlfeat kept them."""
        handle = self._handle
        if "file_sha256" not in handle:
            return None
        with reading(self.path, "file stats and digests"):
            return (handle["file_ino"][start:stop].tolist(), handle["file_ctime_ns"][start:stop].tolist(),
                    handle["file_sha256"][start:stop])

    def digests(self, rows: np.ndarray) -> np.ndarray:
        """The SHA-256 digests ((n, 32) uint8) of distinct `rows`, in the order given; zeros where not recorded
        (all of them in a cache written before tlfeat kept them)."""
        if "file_sha256" not in self._handle or not len(rows):
            return np.zeros((len(rows), 32), dtype=np.uint8)
        order = np.argsort(rows, kind="stable")
        with reading(self.path, "file_sha256"):
            found = read_sorted_rows(self._handle["file_sha256"], rows[order], slack=len(rows))
        result = np.empty_like(found)
        result[order] = found
        return result

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
