"""Writing a cache (the format is tlfeat.cache's): a chunk of rows at a time, committed atomically.

The file is written under a temporary name through a FirstErrorSink (a full disk is an error, not a
crash), after checking the free space, and renamed into place only when complete.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from tlfeat import __version__
from tlfeat.cache import FILE_CHUNK_ROWS, FORMAT_VERSION, STRING_DTYPE, WRITE_CHUNK_ROWS, CacheKey, small_metadata_cache
from tlfeat.errors import TlfeatError
from tlfeat.fileio import FirstErrorSink, atomic_path, check_free_space, os_reason


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
        small_metadata_cache(handle)
        # fletcher32: HDF5 checks every chunk on read, so damaged numbers raise instead of passing as data.
        handle.create_dataset("features", shape=(n, dim), dtype=self.key.dtype, maxshape=(None, dim),
                              chunks=(max(1, min(n, FILE_CHUNK_ROWS)), dim), fletcher32=True)
        for name, dtype in _NUMBER_COLUMNS:
            _numbers(handle, name, dtype, n)  # written by `append`
        handle.create_dataset("file_sha256", shape=(n, 32), dtype=np.uint8, maxshape=(None, 32),
                              chunks=(max(1, min(n, 1 << 14)), 32), fletcher32=True)
        for name in _STRING_COLUMNS:  # chunked, so that `commit` can trim them; a chunk per append (HDF5
            # rewrites a partly written chunk of strings whole, each string anew)
            handle.create_dataset(name, shape=(n,), dtype=STRING_DTYPE, maxshape=(None,),
                                  chunks=(max(1, min(n, WRITE_CHUNK_ROWS)),))

    def append(
        self, features: np.ndarray, labels: Sequence[int], paths: Sequence[str], split: Sequence[str],
        file_size: Sequence[int], file_mtime_ns: Sequence[int], file_ino: Sequence[int] | None = None,
        file_ctime_ns: Sequence[int] | None = None, file_sha256: np.ndarray | None = None,
    ) -> None:
        """The next rows (chunks of WRITE_CHUNK_ROWS rows keep the writes aligned with the file's chunks).

        file_ino, file_ctime_ns and file_sha256 ((n, 32) uint8) not given: recorded as unknown (-1, zeros)."""
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
        n = stop - start
        handle["file_ino"][start:stop] = np.full(n, -1) if file_ino is None else np.asarray(file_ino, dtype=np.int64)
        handle["file_ctime_ns"][start:stop] = (np.full(n, -1) if file_ctime_ns is None
                                               else np.asarray(file_ctime_ns, dtype=np.int64))
        if file_sha256 is not None:  # else HDF5's fill value: zeros, "not recorded"
            handle["file_sha256"][start:stop] = np.asarray(file_sha256, dtype=np.uint8).reshape(n, 32)
        self.written = stop

    def commit(self, class_names: list[str], skipped: list[tuple[str, str, int, int]], extra_attrs: dict) -> None:
        """Finish the file with the rows written so far; it replaces `path` when the `with` block ends."""
        handle = self._handle
        if self.written != self.max_rows:
            for name in ("features", "file_sha256", *(name for name, _ in _NUMBER_COLUMNS), *_STRING_COLUMNS):
                handle[name].resize(self.written, axis=0)
        handle.create_dataset("class_names", data=list(class_names), dtype=STRING_DTYPE)
        handle.create_dataset("skipped_paths", data=[s[0] for s in skipped], dtype=STRING_DTYPE)
        handle.create_dataset("skipped_reasons", data=[s[1] for s in skipped], dtype=STRING_DTYPE)
        _numbers(handle, "skipped_size", np.int64, len(skipped), [s[2] for s in skipped])
        _numbers(handle, "skipped_mtime_ns", np.int64, len(skipped), [s[3] for s in skipped])
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
        own_failure = None
        if exc[0] is None and (self._sink.error is not None or not self._committed):
            own_failure = self._sink.error or RuntimeError("cache not committed")
            exc = (type(own_failure), own_failure, None)
        try:
            self._stack.__exit__(*exc)  # renames the finished file into place, or removes it
        except (OSError, RuntimeError) as failure:  # a failed fsync or rename
            exc = (type(failure), failure, None)
        if exc[0] is not None and issubclass(exc[0], (OSError, RuntimeError)):  # a full disk, mostly
            raise CacheWriteError(f"{self.path}: cannot write the cache ({os_reason(exc[1])}); "
                                  "the previous file is unchanged") from None
        if own_failure is not None:  # anything else a write met (a KeyboardInterrupt): the file was removed
            raise own_failure


_STRING_COLUMNS = ("paths", "split")
_NUMBER_COLUMNS = (("labels", np.int32), ("file_size", np.int64), ("file_mtime_ns", np.int64), ("file_ino", np.int64),
                   ("file_ctime_ns", np.int64))


def _numbers(handle: h5py.File, name: str, dtype: type, n: int, values: Sequence[int] | None = None) -> None:
    """A 1-D numeric column of `n` with an HDF5 checksum (checksums need chunked storage): `values`, or
    none yet (HDF5's fill value stands in for them: nothing is held)."""
    handle.create_dataset(name, shape=(n,), dtype=dtype, data=None if values is None else np.asarray(values, dtype),
                          chunks=(max(1, min(n, 1 << 16)),), maxshape=(None,), fletcher32=True)
