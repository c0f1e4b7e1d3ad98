"""What every analysis shares: the cache's features read on demand and checked, normalisation, output folders,
optional imports.

No analysis loads a whole cache: the features stay in the HDF5 file and are read
a block (or a selection of rows) at a time, so memory is bounded by what each
analysis keeps (see each module), not by the cache.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

import numpy as np

from tlfeat.cache import CacheData, open_rows
from tlfeat.cache_checks import non_finite_error
from tlfeat.errors import TlfeatError
from tlfeat.fileio import check_output_path, check_outside_dataset

# The extra that installs every optional library an analysis may import.
EXTRA = "tlfeat[analysis]"
BLOCK_ROWS = 8192  # rows per read: 42 MB of 1280-d float32
# HDF5 reads scattered rows one by one, ~50x slower per row than reading whole blocks in order
# (Scene15's cache: 1,000 rows 134 ms, all 4,485 rows 13 ms): below N/50 rows, one by one.
POINT_READ_SHARE = 50


def optional_import(module: str, package: str) -> ModuleType:
    """Import an optional library, or fail with one line naming the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TlfeatError(f"{package} is not installed: pip install {package} (or pip install '{EXTRA}')") from None


class StoredFeatures:
    """A cache's features as float32 rows read on demand (float16 caches are upcast), refusing NaN or inf.

    Slicing (`features[a:b]`) and increasing row arrays read straight from the
    HDF5 dataset; `rows` takes any row order. A row with a NaN or infinite value
    is a one-line error naming the cache and the image (a cosine similarity with
    it means nothing); all-zero rows are kept (their cosine to anything is 0).
    """

    def __init__(self, stored: Any, cache: Path, paths: np.ndarray) -> None:
        self.stored, self.cache, self.paths = stored, cache, paths
        self.shape = tuple(stored.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | np.ndarray) -> np.ndarray:
        block = np.asarray(self.stored[key], dtype=np.float32)
        bad = ~np.isfinite(block).all(axis=1)
        if bad.any():
            raise non_finite_error(self.cache, self.paths[np.arange(self.shape[0])[key][bad]])
        return block

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The features of `rows`, in that order (repeats allowed)."""
        unique, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
        if len(unique) * POINT_READ_SHARE <= self.shape[0]:
            found = self[unique] if len(unique) else np.zeros((0, self.shape[1]), dtype=np.float32)
        else:
            found = np.concatenate([
                block[unique[(unique >= start) & (unique < start + len(block))] - start]
                for start, block in self.blocks()
            ])
        return found[inverse]

    def blocks(self, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows) for every block of `block_rows` rows, in order."""
        for start in range(0, self.shape[0], block_rows):
            yield start, self[start : start + block_rows]


@contextmanager
def open_cache(cache: str | Path, min_rows: int = 2) -> Iterator[tuple[CacheData, StoredFeatures]]:
    """A cache's per-row columns (labels, paths, split, classes, attrs; `features` left empty) and its
    features on demand; fewer than `min_rows` images is a one-line error."""
    cache = Path(cache)
    with open_rows(cache) as (data, stored):
        if len(data) < min_rows:
            raise TlfeatError(f"{cache}: {len(data)} image(s) in the cache; this analysis needs at least {min_rows}")
        yield data, StoredFeatures(stored, cache, data.paths)


def normalise(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (all-zero rows stay zero), so dot products are cosines."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, np.finfo(np.float32).tiny)


def dataset_root(data: CacheData) -> Path | None:
    """The folder the cache's relative paths start from, or None when the cache does not record one."""
    root = data.attrs.get("dataset_root")
    return Path(root) if root else None


def output_folder(cache: str | Path, out: str | Path | None, topic: str, data: CacheData) -> Path:
    """`out`, or ``<cache folder>/<topic>/<cache stem>/``; never a folder inside the dataset."""
    cache = Path(cache)
    folder = Path(out) if out is not None else cache.parent / topic / cache.stem
    check_outside_dataset(folder, dataset_root(data))
    check_output_path(folder, folder=True)
    return folder
