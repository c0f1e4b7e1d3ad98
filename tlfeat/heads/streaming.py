"""Heads on caches larger than memory: `fit-head --streaming`.

The cache's features are read a chunk of rows at a time and never held whole:
one pass computes the scaling statistics (`StandardScaler.partial_fit`), then
`SGDClassifier.partial_fit` makes several passes over the train rows. A cache
stores its rows class by class, so a chunk of consecutive rows holds one or two
classes, and SGD fitted chunk after chunk follows the last classes it saw (on
Scene15, 100-row chunks lost 2-3 test points). Each pass therefore cuts the
train rows into small tiles of consecutive rows (`tile_rows`: 1/16 of a chunk,
at most one HDF5 chunk of the file), draws a seeded permutation of the tiles,
and makes each SGD chunk of the next tiles of that permutation, its rows
shuffled: every chunk mixes rows from all over the cache, while each tile is
still read as one slice (point reads of scattered rows are far slower).
Scoring streams the same way. Memory is bounded by the chunk size plus the
per-row columns (labels, split, paths), which are small next to the features.

`logreg` becomes SGD on the logistic loss; `linear-svm` SGD on the modified
Huber loss, the hinge made smooth so that the head has probabilities
(`predict_proba`), as every tlfeat head does. The fitted head is an ordinary
scikit-learn pipeline saved like any other, so predict, evaluate and compare
take it as they are. Like fit-head, it holds the output folder's lock, records
the rows it saw and leaves copies of training rows out of the val/test scores.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import h5py
import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from tlfeat.cache import FILE_CHUNK_ROWS, open_rows, read_sorted_rows
from tlfeat.data.scan import SPLITS
from tlfeat.errors import TlfeatError, integer, seed_value
from tlfeat.fileio import check_output_path, check_outside_dataset
from tlfeat.heads.folder import (
    NON_FINITE_ADVICE, FitSummary, check_same_data, check_trainable, check_unique_paths, default_out, folder_key,
    head_metadata, left_out_note, locked_folder, save_fitted_head, source_record, write_summary,
)
from tlfeat.heads.registry import DEFAULT_CHUNK_ROWS, DEFAULT_PASSES, HEADS, STREAMABLE_HEADS, STREAMING_SUFFIX
from tlfeat.heads.rows import RowIds, rows_digest, seen_rows
from tlfeat.reports import ImageOutcomes, split_metrics

ALPHA = 1e-3  # L2 strength: best on Scene15 val of 1e-4..3e-2 for both losses (10 passes)


def _chunks(rows: np.ndarray, chunk_rows: int) -> list[np.ndarray]:
    return [rows[i : i + chunk_rows] for i in range(0, len(rows), chunk_rows)]


def tile_rows(chunk_rows: int) -> int:
    """Consecutive train rows read together when a pass draws its chunks: 16 tiles make a chunk, so a chunk
    mixes 16 places of the cache, and a tile is at most one HDF5 chunk of the file (`FILE_CHUNK_ROWS`)."""
    return min(FILE_CHUNK_ROWS, max(1, chunk_rows // 16))


def _shuffled_chunks(rows: np.ndarray, chunk_rows: int, rng: np.random.Generator) -> list[list[np.ndarray]]:
    """One pass's chunks: the tiles of `rows` in a random order, the next `chunk_rows // tile` tiles a chunk."""
    tile = tile_rows(chunk_rows)
    tiles = _chunks(rows, tile)
    order = rng.permutation(len(tiles))
    per_chunk = max(1, chunk_rows // tile)
    return [[tiles[i] for i in order[start : start + per_chunk]] for start in range(0, len(order), per_chunk)]


def _read(features: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Rows (sorted indices) of the features as float32; a tile of train rows between a few val rows is one
    slice read (at most one HDF5 chunk more than the tile)."""
    return np.asarray(read_sorted_rows(features, rows, slack=FILE_CHUNK_ROWS), dtype=np.float32)


def _row_ids(path: Path, index: object, features: h5py.Dataset, chunk_rows: int) -> RowIds:
    """Every row's identities (`tlfeat.heads.rows`), in one pass that also refuses NaN or inf values."""
    with h5py.File(path, "r") as handle:
        sizes = handle["file_size"][...]
    parts = []
    for chunk in _chunks(np.arange(len(index.labels)), chunk_rows):
        block = _read(features, chunk)
        if not np.isfinite(block).all():
            raise TlfeatError(f"{path}: NaN or inf feature values; {NON_FINITE_ADVICE}")
        parts.append(RowIds.of(index.paths[chunk], sizes[chunk], block))
    return RowIds.concat(parts)


def _fit_sgd(
    features: h5py.Dataset, train_rows: np.ndarray, labels: np.ndarray, n_classes: int, loss: str, chunk_rows: int,
    passes: int, seed: int,
) -> tuple[Pipeline, float]:
    """Scaling statistics in one pass, then `passes` passes of SGD over shuffled tiles; returns the pipeline and
    its seconds."""
    started = time.perf_counter()
    scaler = StandardScaler()
    for chunk in _chunks(train_rows, chunk_rows):
        scaler.partial_fit(_read(features, chunk))
    classifier = SGDClassifier(loss=loss, alpha=ALPHA, random_state=seed)
    rng = np.random.default_rng(seed)
    classes = np.arange(n_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)  # overflow in exp on far-off rows
        for _ in range(passes):
            for tiles in _shuffled_chunks(train_rows, chunk_rows, rng):
                chunk = np.concatenate(tiles)
                order = rng.permutation(len(chunk))
                block = np.concatenate([_read(features, tile) for tile in tiles])
                classifier.partial_fit(scaler.transform(block)[order], labels[chunk][order], classes=classes)
    return Pipeline([("standardscaler", scaler), ("sgdclassifier", classifier)]), time.perf_counter() - started


def fit_streaming(
    cache: Path,
    head: str = "logreg",
    out: Path | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    passes: int = DEFAULT_PASSES,
    seed: int = 0,
) -> FitSummary:
    """Fit `head` (logreg or linear-svm) on a cache read in chunks of `chunk_rows`; score, save, report."""
    if head not in STREAMABLE_HEADS:
        raise TlfeatError(f"`streaming` fits {' or '.join(STREAMABLE_HEADS)}, not {head!r}")
    loss = HEADS[head].streaming_loss
    chunk_rows, passes, seed = integer("chunk_rows", chunk_rows, 1), integer("passes", passes, 1), seed_value(seed)
    cache = Path(cache)
    out = Path(out) if out is not None else default_out([cache])
    check_output_path(out, folder=True)
    with open_rows(cache) as (index, features):
        attrs, labels, class_names, split = index.attrs, index.labels, index.class_names, index.split
        check_outside_dataset(out, attrs.get("dataset_root"))
        check_trainable(str(cache), labels, split, class_names)
        check_unique_paths(cache, index.paths)
        ids = _row_ids(cache, index, features, chunk_rows)  # refuses NaN or inf: before `out` is created, as fit-head
        with locked_folder(out):
            rows = {s: np.flatnonzero(split == s) for s in SPLITS if np.any(split == s)}
            feature_dim = int(features.shape[1])
            sources = [source_record(cache, attrs, len(labels), feature_dim)]
            digest = rows_digest(split, ids)
            check_same_data(out, folder_key(sources, digest), ids, split, cache.name, [head + STREAMING_SUFFIX])

            estimator, fit_seconds = _fit_sgd(features, rows["train"], labels, len(class_names), loss, chunk_rows,
                                              passes, seed)
            seen = {"train": ids.take(split == "train")}
            metrics, notes, test = {}, [], None
            for name, split_rows in rows.items():
                kept = split_rows[~seen_rows(name, ids.take(split == name), seen)]
                if len(kept) < len(split_rows):
                    notes.append(left_out_note(name, len(split_rows) - len(kept)))
                if len(kept):
                    predicted = np.concatenate([estimator.predict(_read(features, c)) for c in _chunks(kept, chunk_rows)])
                    metrics[name] = split_metrics(labels[kept], predicted, class_names)
                    if name == "test":
                        test = ImageOutcomes(ids.by_file[kept], labels[kept], predicted)
            counts = {s: len(r) for s, r in rows.items()}
            meta = head_metadata(
                head + STREAMING_SUFFIX, f"streaming {head}: StandardScaler (one pass) + SGDClassifier({loss})",
                estimator, class_names, feature_dim, sources, cache.name, {"digest": digest, "counts": counts},
                {"alpha": ALPHA, "passes": passes, "chunk_rows": chunk_rows}, None, seed, fit_seconds, None,
            )
            result = save_fitted_head(out, estimator, meta, metrics, seen, notes, test)
            return write_summary(out, [result], sources, counts)
