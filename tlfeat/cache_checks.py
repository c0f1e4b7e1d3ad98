"""Checks on reading a cache: its structure when it is opened, and damage found while reading it.

A damaged file is a one-line error naming it, never data: h5py verifies the
fletcher32 checksum of every chunk it reads (tlfeat.cache writes them), and a
failed check, like any unreadable column or attribute, becomes a
DamagedCacheError here; a newer format version is refused by name.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import h5py
import numpy as np

from tlfeat.data.scan import SPLITS
from tlfeat.errors import TlfeatError
from tlfeat.fileio import os_reason

ROW_COLUMNS = ("labels", "paths", "split", "file_size", "file_mtime_ns")
# Per-row columns that caches written before tlfeat kept them lack: all three, or none.
STAT_COLUMNS = ("file_ino", "file_ctime_ns", "file_sha256")
SKIP_COLUMNS = ("skipped_paths", "skipped_reasons", "skipped_size", "skipped_mtime_ns")
KEY_ATTRS = ("backbone", "weights", "input_size", "preprocessing", "dtype")
REBUILD = "rebuild it with extract --overwrite"


class DamagedCacheError(TlfeatError):
    """A cache file that fails a check; the message names it, the problem, and how to rebuild it."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: damaged cache: {problem}; {REBUILD}")


def check_structure(
    path: Path, handle: h5py.File, decode_attrs: Callable[[h5py.File], dict], parse_key: Callable[[dict], Any],
    reads_up_to: int,
) -> None:
    """Refuse a file that is not a whole tlfeat cache this tlfeat reads: format version (`reads_up_to`),
    columns, row counts, key attributes (`parse_key` must accept them)."""
    try:
        attrs = decode_attrs(handle)
        present = set(handle.keys())
    except (OSError, RuntimeError, KeyError, ValueError) as exc:  # a damaged object header or attribute
        raise DamagedCacheError(path, f"its attributes cannot be read ({exc.__class__.__name__})") from None
    if "format_version" not in attrs or "features" not in present:
        raise TlfeatError(f"{path}: HDF5 file is not a tlfeat cache (no features/format_version)")
    version = attrs["format_version"]
    if not isinstance(version, int) or version < 1:
        raise DamagedCacheError(path, f"format_version {version!r} is not a version number")
    if version > reads_up_to:
        raise TlfeatError(
            f"{path}: written by a newer tlfeat (cache format version {version}; this tlfeat reads up to "
            f"{reads_up_to}): upgrade tlfeat to read it"
        )
    missing = [n for n in (*ROW_COLUMNS, "class_names", *SKIP_COLUMNS) if n not in present]
    missing += [f"attribute {n}" for n in KEY_ATTRS if n not in attrs]
    if any(n in present for n in STAT_COLUMNS):
        missing += [n for n in STAT_COLUMNS if n not in present]
    if missing:
        raise DamagedCacheError(path, f"{', '.join(missing)} missing")
    try:
        parse_key(attrs)
    except (TypeError, ValueError):
        raise DamagedCacheError(path, "its key attributes do not parse") from None
    features = handle["features"]
    if features.ndim != 2:
        raise DamagedCacheError(path, f"features has shape {features.shape}, not (rows, dims)")
    row_columns = (*ROW_COLUMNS, *(n for n in STAT_COLUMNS if n in present))
    counts = {n: len(handle[n]) for n in (*row_columns, *SKIP_COLUMNS)}
    wrong = [f"{n} {c}" for n, c in counts.items() if n in row_columns and c != features.shape[0]]
    wrong += [f"{n} {c}" for n, c in counts.items() if n in SKIP_COLUMNS and c != counts["skipped_paths"]]
    if wrong:
        raise DamagedCacheError(path, f"row counts disagree (features {features.shape[0]}, {', '.join(wrong)})")
    if attrs.get("feature_dim", features.shape[1]) != features.shape[1]:
        raise DamagedCacheError(
            path, f"feature_dim {attrs['feature_dim']} but features have {features.shape[1]} columns"
        )


@contextmanager
def reading(path: Path, what: str) -> Iterator[None]:
    """Turn a failed read of `what` (an HDF5 checksum or decoding failure) into a one-line error."""
    try:
        yield
    except (OSError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise DamagedCacheError(path, f"{what} fails its checksum or cannot be read ({os_reason(exc)})") from None


def read_column(path: Path, dataset: h5py.Dataset, index: slice | np.ndarray = slice(None)) -> np.ndarray:
    """Values of a dataset (strings as an object array), damage reported by `reading`."""
    with reading(path, dataset.name.lstrip("/")):
        if h5py.check_string_dtype(dataset.dtype) is not None:
            return np.array(dataset.asstr()[...], dtype=object)[index] if len(dataset) else np.array([], dtype=object)
        return dataset[index]


def rows_meta(path: Path, handle: h5py.File, attrs: dict, index: slice | np.ndarray = slice(None)) -> dict:
    """labels, paths, split, class_names and attrs of (some) rows, checked: CacheData's fields but features."""
    split = read_column(path, handle["split"], index)
    class_names = list(read_column(path, handle["class_names"]))
    labels = checked_labels(path, read_column(path, handle["labels"], index), split, len(class_names))
    return dict(labels=labels, paths=read_column(path, handle["paths"], index), split=split,
                class_names=class_names, attrs=attrs)


class CheckedFeatures:
    """An open cache's `features`, read in slices; damaged data is a one-line error naming the file."""

    def __init__(self, path: Path, dataset: h5py.Dataset) -> None:
        self.path, self.dataset = path, dataset
        self.shape, self.dtype = dataset.shape, dataset.dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        return read_column(self.path, self.dataset, index)


def checked_labels(path: Path, labels: np.ndarray, split: np.ndarray, n_classes: int) -> np.ndarray:
    """`labels` as int64, refused when one is outside the classes or a split value is unknown."""
    labels = np.asarray(labels, dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if len(bad):
        raise DamagedCacheError(
            path, f"label {labels[bad[0]]} at row {bad[0]} is outside its {n_classes} classes ({len(bad)} such rows)"
        )
    unknown = sorted(set(np.asarray(split).tolist()) - set(SPLITS))
    if unknown:
        raise DamagedCacheError(path, f"split values {unknown} are not train/val/test")
    return labels


def non_finite_error(cache: Path, paths: Sequence[str]) -> TlfeatError:
    """The one-line error for rows whose features hold NaN or inf (a cosine or an export of them means
    nothing): the cache, the first such image and how many more the same read found."""
    more = len(paths) - 1
    others = f" and {more} other image{'s' if more > 1 else ''} read with it" if more else ""
    return TlfeatError(f"{cache}: NaN or infinite features (image {paths[0]}{others}); "
                       "re-extract this cache (extract --overwrite)")
