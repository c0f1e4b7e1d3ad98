"""Nearest neighbours by cosine similarity: exact blocked matrix products, or an approximate faiss index.

Exact search streams the base rows a block at a time (from memory or straight
from the cache's HDF5 dataset), L2-normalises each block and keeps a running
top-k per query, so memory is bounded by the block, not by the cache: the
largest temporaries are one block of features and one (query chunk x block)
similarity matrix.

The approximate index is faiss's IVF with 8-bit scalar-quantised vectors
(IVF-SQ8, inner product on normalised rows): a quarter of the float32 features'
size in memory. It may miss neighbours outside the `nprobe` cells it scans, and
its similarities are off by about 1e-3; `rescore` recomputes them exactly from
the cache for the candidates it returns. It is built once and saved beside the
cache as ``<cache>.faiss``, with ``<cache>.faiss.json`` holding the cache's size
and modification time: a cache rewritten since gets a new index. Where it cannot
be saved (a read-only folder), it is used from memory and the caller is told.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tlfeat.analysis.common import BLOCK_ROWS, StoredFeatures, normalise, optional_import
from tlfeat.errors import parameter_error
from tlfeat.fileio import atomic_path, atomic_write_bytes, os_reason

QUERY_ROWS = 2048  # queries per similarity matrix: with BLOCK_ROWS, 67 MB
INDEX_FORMAT = "tlfeat-faiss-index"
INDEX_FORMAT_VERSION = 1
MAX_LISTS = 4096


class RowSource(Protocol):
    """An (N, D) array or an h5py features dataset: anything with a shape and row slicing."""

    shape: tuple[int, ...]

    def __getitem__(self, key: Any) -> Any: ...


@dataclass
class Neighbours:
    """Top-k per query, most similar first; where fewer than k rows qualify, index -1 and similarity -inf."""

    indices: np.ndarray  # (q, k) int64 rows of the base
    similarities: np.ndarray  # (q, k) float32 cosine similarities


def _merge(best: Neighbours, sims: np.ndarray, offset: int) -> Neighbours:
    """The k best of the running top-k and one block's similarities (block columns start at row `offset`)."""
    k = best.indices.shape[1]
    take = min(k, sims.shape[1])
    part = np.argpartition(-sims, take - 1, axis=1)[:, :take]
    cand_sims = np.concatenate([best.similarities, np.take_along_axis(sims, part, axis=1)], axis=1)
    cand_idx = np.concatenate([best.indices, part + offset], axis=1)
    order = np.argsort(-cand_sims, axis=1, kind="stable")[:, :k]
    return Neighbours(np.take_along_axis(cand_idx, order, 1), np.take_along_axis(cand_sims, order, 1))


def exact_top_k(
    queries: np.ndarray, base: RowSource, k: int, exclude: np.ndarray | None = None,
    block_rows: int = BLOCK_ROWS, query_rows: int = QUERY_ROWS,
) -> Neighbours:
    """The k base rows most cosine-similar to each query, exactly, reading `base` one block at a time.

    `exclude[i]` is a base row that query i must not return (itself, for a query
    taken from the base), or -1. The base is read once, whatever the number of queries.
    """
    if k < 1:
        raise parameter_error("top", k, "must be at least 1")
    q = normalise(queries)
    n = int(base.shape[0])
    best = Neighbours(np.full((len(q), k), -1, np.int64), np.full((len(q), k), -np.inf, np.float32))
    for start in range(0, n, block_rows):
        block = normalise(base[start : start + block_rows])
        for q0 in range(0, len(q), query_rows):
            sims = q[q0 : q0 + query_rows] @ block.T
            np.nan_to_num(sims, copy=False, nan=-np.inf)  # a row with NaN features matches nothing
            if exclude is not None:
                own = exclude[q0 : q0 + query_rows] - start
                rows = np.flatnonzero((own >= 0) & (own < len(block)))
                sims[rows, own[rows]] = -np.inf
            part = _merge(Neighbours(best.indices[q0 : q0 + query_rows], best.similarities[q0 : q0 + query_rows]),
                          sims, start)
            best.indices[q0 : q0 + query_rows], best.similarities[q0 : q0 + query_rows] = part.indices, part.similarities
    best.indices[~np.isfinite(best.similarities)] = -1
    return best


# --- faiss ------------------------------------------------------------------------------------


def index_path(cache: str | Path) -> Path:
    """Where the faiss index of a cache lives: beside it, ``<cache>.faiss``."""
    cache = Path(cache)
    return cache.with_name(cache.name + ".faiss")


def _index_key(cache: Path, n: int, dim: int) -> dict:
    stat = cache.stat()
    return {
        "format": INDEX_FORMAT, "format_version": INDEX_FORMAT_VERSION, "cache": cache.name,
        "cache_size": stat.st_size, "cache_mtime_ns": stat.st_mtime_ns, "rows": n, "feature_dim": dim,
    }


def n_lists(n: int) -> int:
    """IVF cells: about sqrt(N) (faiss's usual advice), with 39+ training rows per cell, at most MAX_LISTS."""
    return max(1, min(MAX_LISTS, int(np.sqrt(n)), n // 39))


def build_index(features: StoredFeatures, seed: int = 0) -> Any:
    """An IVF-SQ8 inner-product index over the normalised rows of a cache, trained on a random sample of them."""
    faiss = optional_import("faiss", "faiss-cpu")
    n, dim = features.shape
    lists = n_lists(n)
    index = faiss.index_factory(dim, f"IVF{lists},SQ8", faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(seed).choice(n, size=min(n, 40 * lists), replace=False)
    index.train(normalise(features.rows(sample)))
    for _, block in features.blocks():
        index.add(normalise(block))
    return index


def open_index(cache: str | Path, features: StoredFeatures, rebuild: bool = False) -> tuple[Any, bool, str | None]:
    """The saved index of `cache` if it was built from the cache as it is now, else a new one saved beside it.

    Returns (index, built, unsaved): built tells whether this call built it; unsaved is None, or a note
    saying why a new index could not be saved (a read-only folder, a full disk): it is used from memory,
    and the next call builds it again.
    """
    faiss = optional_import("faiss", "faiss-cpu")
    cache = Path(cache)
    path, meta = index_path(cache), index_path(cache).with_suffix(".faiss.json")
    key = _index_key(cache, *features.shape)
    if not rebuild and path.is_file() and meta.is_file():
        try:
            current = json.loads(meta.read_text()) == key
        except (OSError, ValueError):
            current = False
        if current:
            try:
                return faiss.read_index(str(path)), False, None
            except RuntimeError:
                pass  # unreadable (e.g. cut short by a full disk): rebuilt below
    index = build_index(features)
    try:
        meta.unlink(missing_ok=True)  # the key goes last: an index without its key is never trusted
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))  # to a file, not via serialize_index: no second copy in memory
        atomic_write_bytes(meta, (json.dumps(key, indent=2) + "\n").encode())
    except (OSError, RuntimeError) as exc:  # faiss reports a file it cannot open as RuntimeError "...: <why>"
        reason = os_reason(exc) if isinstance(exc, OSError) else str(exc).rsplit(": ", 1)[-1]
        return index, True, (f"the faiss index was used from memory, not saved: cannot write {path.name} in "
                             f"{path.parent} ({reason}); every search builds it again")
    return index, True, None


def index_top_k(
    index: Any, queries: np.ndarray, k: int, exclude: np.ndarray | None = None, nprobe: int = 16,
    query_rows: int = 65536,
) -> Neighbours:
    """Approximate top-k from a faiss index built by `build_index`, same conventions as `exact_top_k`.

    Similarities are the index's approximations; see `rescore`.
    """
    faiss = optional_import("faiss", "faiss-cpu")
    if k < 1:
        raise parameter_error("top", k, "must be at least 1")
    faiss.extract_index_ivf(index).nprobe = nprobe
    extra = 0 if exclude is None else 1
    out = Neighbours(np.full((len(queries), k), -1, np.int64), np.full((len(queries), k), -np.inf, np.float32))
    for q0 in range(0, len(queries), query_rows):
        sims, idx = index.search(normalise(queries[q0 : q0 + query_rows]), k + extra)
        sims[idx < 0] = -np.inf
        if exclude is not None:
            sims[idx == exclude[q0 : q0 + query_rows, None]] = -np.inf
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        out.indices[q0 : q0 + query_rows] = np.take_along_axis(idx, order, 1)
        out.similarities[q0 : q0 + query_rows] = np.take_along_axis(sims, order, 1)
    out.indices[~np.isfinite(out.similarities)] = -1
    return out


def rescore(queries: np.ndarray, found: Neighbours, features: StoredFeatures, k: int) -> Neighbours:
    """Exact cosine similarities for approximate candidates (read from the cache), best k of them first."""
    q = normalise(queries)
    valid = found.indices >= 0
    rows = found.indices[valid]
    candidates = normalise(features.rows(rows))
    sims = np.full(found.indices.shape, -np.inf, dtype=np.float32)
    sims[valid] = np.einsum("ij,ij->i", candidates, np.repeat(q, valid.sum(axis=1), axis=0))
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    best = Neighbours(np.take_along_axis(found.indices, order, 1), np.take_along_axis(sims, order, 1))
    best.indices[~np.isfinite(best.similarities)] = -1
    return best
