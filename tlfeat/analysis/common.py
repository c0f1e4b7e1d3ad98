"""What every analysis shares: checked loading of a cache, normalisation, output folders, optional imports."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import numpy as np

from tlfeat.cache import CacheData, load
from tlfeat.errors import TlfeatError

# The extra that installs every optional library an analysis may import.
EXTRA = "tlfeat[analysis]"


def optional_import(module: str, package: str) -> ModuleType:
    """Import an optional library, or fail with one line naming the pip command that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise TlfeatError(f"{package} is not installed: pip install {package} (or pip install '{EXTRA}')") from None


def load_checked(cache: str | Path, min_rows: int = 2) -> CacheData:
    """A whole cache as float32 (float16 caches are upcast by `load`), refusing what no analysis can use.

    Refused, each with one line naming the file: fewer than `min_rows` rows, and
    NaN or infinite feature values (a cosine similarity with them is meaningless).
    All-zero rows are kept: their cosine similarity to anything is 0.
    """
    data = load(cache)
    if len(data) < min_rows:
        raise TlfeatError(f"{cache}: {len(data)} image(s) in the cache; this analysis needs at least {min_rows}")
    bad = ~np.isfinite(data.features).all(axis=1)
    if bad.any():
        raise TlfeatError(
            f"{cache}: {int(bad.sum())} of {len(data)} rows have NaN or infinite features "
            f"(first: {data.paths[np.flatnonzero(bad)[0]]}); re-extract this cache (extract --overwrite)"
        )
    return data


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
    root = dataset_root(data)
    if root is not None and folder.resolve().is_relative_to(root.resolve()):
        raise TlfeatError(
            f"{folder}: inside the dataset folder {root}; analyses never write there, pass `out` elsewhere"
        )
    if folder.exists() and not folder.is_dir():
        raise TlfeatError(f"{folder}: exists and is not a folder; pass `out` as a folder path")
    return folder
